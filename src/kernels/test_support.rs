//! What the kernel tests share: comparing our ops with candle's, values and gradients.

use candle_core::{DType, Tensor, Var};

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// For each of `vars`, the largest difference between its gradients through `ours` and through `theirs`,
/// both backpropagated from `sum(output * probe)` with the same `probe`.
pub fn gradient_gaps(ours: &Tensor, theirs: &Tensor, probe: &Tensor, vars: &[&Var]) -> Vec<f64> {
    let backward = |t: &Tensor| (t * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let (g1, g2) = (backward(ours), backward(theirs));
    vars.iter()
        .map(|v| {
            max_abs(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            )
        })
        .collect()
}

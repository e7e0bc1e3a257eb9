//! Where a matrix lies in a slice: what the GEMMs (the GEMM crate's, through `common::gemm_into`, and
//! `bf16`'s) are handed.

/// Where a matrix lies in a slice: element `(i, j)` at `offset + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(super) struct View {
    pub(super) offset: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl View {
    pub(super) fn strided(offset: usize, rs: usize, cs: usize) -> Self {
        Self { offset, rs, cs }
    }

    /// Whether a `rows x cols` matrix at this view stays inside `len` values.
    pub(super) fn fits(&self, rows: usize, cols: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs < len
    }
}

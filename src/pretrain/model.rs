//! A stacked autoencoder: an encoder (the [`Backbone`] that fine-tuning starts from) plus one decoder stage
//! per encoder stage, in one `VarMap`.
//!
//! Key layout: the encoder's own keys (`stage1.weight`, `stage1.bias`, ...) and, for stage K, the decoder's
//! `decoder.stageK.bias` and, unless weights are tied, `decoder.stageK.weight`. Decoder stage K maps the
//! codes of stage K back to the input of stage K: a dense stage with `W_dec` `[in, out]` (tied: the
//! encoder's `W` `[out, in]` used transposed, the same storage, so there is nothing to keep in sync), a
//! convolutional stage with a stride-2 transposed convolution whose kernel `[out, in, 3, 3]` has the
//! encoder's layout (tied: the encoder's kernel itself). The first decoder stage ends in a sigmoid
//! (pixels in [0, 1]); upper ones end in the encoder's activation when that is bounded (sigmoid, tanh) and
//! are linear otherwise, so each can reach the codes it reconstructs.

use crate::models::encoder::{
    ConvEncoder, DenseEncoder, EncoderActivation, EncoderConfig, EncoderKind, CONV_KERNEL,
    CONV_PADDING, CONV_STRIDE,
};
use crate::models::{Backbone, Mode};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::init::Init;
use candle_nn::{VarBuilder, VarMap};

/// Key prefix of the decoder.
pub const DECODER_PREFIX: &str = "decoder";

enum Encoder {
    Dense(DenseEncoder),
    Conv(ConvEncoder),
}

struct DecoderStage {
    /// `None` when tied to the encoder's weight.
    weight: Option<Tensor>,
    bias: Tensor,
}

/// Encoder plus decoder; see the module doc.
pub struct StackedAutoencoder {
    pub config: EncoderConfig,
    pub tied: bool,
    pub varmap: VarMap,
    encoder: Encoder,
    decoder: Vec<DecoderStage>,
}

impl StackedAutoencoder {
    /// Fresh weights: the encoder's activation-matched initialisation, Xavier/Glorot uniform decoder
    /// weights, zero biases.
    pub fn new(config: EncoderConfig, tied: bool, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = match config.kind {
            EncoderKind::Dense { .. } => {
                Encoder::Dense(DenseEncoder::new(config.clone(), vb.clone())?)
            }
            EncoderKind::Conv { .. } => {
                Encoder::Conv(ConvEncoder::new(config.clone(), vb.clone())?)
            }
        };
        let w = config.widths();
        let dvb = vb.pp(DECODER_PREFIX);
        let decoder = (0..config.stages())
            .map(|i| {
                let vb = dvb.pp(format!("stage{}", i + 1));
                let (fan_in, fan_out, shape) = match config.kind {
                    EncoderKind::Dense { .. } => (w[i + 1], w[i], vec![w[i], w[i + 1]]),
                    EncoderKind::Conv { .. } => {
                        let k2 = CONV_KERNEL * CONV_KERNEL;
                        (
                            w[i + 1] * k2,
                            w[i] * k2,
                            vec![w[i + 1], w[i], CONV_KERNEL, CONV_KERNEL],
                        )
                    }
                };
                let weight = if tied {
                    None
                } else {
                    let init = EncoderActivation::Sigmoid.init(fan_in, fan_out);
                    Some(vb.get_with_hints(shape, "weight", init)?)
                };
                let bias = vb.get_with_hints(w[i], "bias", Init::Const(0.0))?;
                Ok(DecoderStage { weight, bias })
            })
            .collect::<Result<_>>()?;
        Ok(StackedAutoencoder {
            config,
            tied,
            varmap,
            encoder,
            decoder,
        })
    }

    pub fn stages(&self) -> usize {
        self.config.stages()
    }

    /// The encoder as a backbone.
    pub fn encoder(&self) -> &dyn Backbone {
        match &self.encoder {
            Encoder::Dense(e) => e,
            Encoder::Conv(e) => e,
        }
    }

    /// The encoder weight of stage `i` (0-based): dense `[out, in]`, conv `[out, in, 3, 3]`.
    pub fn encoder_weight(&self, i: usize) -> &Tensor {
        match &self.encoder {
            Encoder::Dense(e) => &e.stages[i].weight,
            Encoder::Conv(e) => e.stages[i].weight(),
        }
    }

    /// The weight decoder stage `i` uses: its own, or (tied) the encoder's.
    pub fn decoder_weight(&self, i: usize) -> &Tensor {
        self.decoder[i]
            .weight
            .as_ref()
            .unwrap_or_else(|| self.encoder_weight(i))
    }

    /// Key prefixes of the parameters stage `i` trains: its encoder layer and its decoder layer.
    pub fn stage_prefixes(i: usize) -> [String; 2] {
        [
            format!("stage{}.", i + 1),
            format!("{DECODER_PREFIX}.stage{}.", i + 1),
        ]
    }

    /// Encoder stage `i` on `x`.
    pub fn encode_stage(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.encoder().forward_group(i, x, mode)
    }

    /// Codes of stages `0..n` (`n == 0`: `x` itself), every stage frozen: the input of stage `n`.
    pub fn codes_below(&self, n: usize, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for i in 0..n {
            h = self.encode_stage(i, &h, Mode::Frozen)?;
        }
        Ok(h)
    }

    /// Decoder stage `i`: codes of stage `i` back to the shape `target` of its input.
    pub fn decode_stage(
        &self,
        i: usize,
        h: &Tensor,
        target: &[usize],
        mode: Mode,
    ) -> Result<Tensor> {
        let w = mode.weight(self.decoder_weight(i));
        let b = mode.weight(&self.decoder[i].bias);
        let y = match &self.encoder {
            Encoder::Dense(_) => {
                // Tied: W is the encoder's [out, in], so h W maps out -> in; untied W_dec is [in, out].
                let y = if self.tied {
                    h.matmul(&w)?
                } else {
                    h.matmul(&w.t()?)?
                };
                y.broadcast_add(&b)?
            }
            Encoder::Conv(_) => {
                let (th, tw) = (target[2], target[3]);
                let (_, _, hh, hw) = h.dims4()?;
                let pad = |t: usize, s: usize| -> Result<usize> {
                    let base = (s - 1) * CONV_STRIDE + CONV_KERNEL - 2 * CONV_PADDING;
                    t.checked_sub(base)
                        .filter(|&p| p < CONV_STRIDE)
                        .ok_or_else(|| {
                            Error::config(
                                "conv decoder",
                                format!("cannot grow a {s}-pixel map back to {t} pixels"),
                            )
                        })
                };
                let (ph, pw) = (pad(th, hh)?, pad(tw, hw)?);
                if ph != pw {
                    return Err(Error::config(
                        "conv decoder",
                        format!("images must be square, got {th}x{tw}"),
                    ));
                }
                let y = h.conv_transpose2d(&w, CONV_PADDING, ph, CONV_STRIDE, 1)?;
                y.broadcast_add(&b.reshape((1, (), 1, 1))?)?
            }
        };
        let y = if i == 0 {
            candle_nn::ops::sigmoid(&y)?
        } else {
            match self.config.activation.bounds() {
                Some(_) => self.config.activation.apply(&y)?,
                None => y,
            }
        };
        Ok(y.reshape(target)?)
    }

    /// Encodes `x` through stages `0..=top` and decodes back: the reconstruction of `x` by the first
    /// `top + 1` stages, every stage in `mode`.
    pub fn reconstruct(&self, x: &Tensor, top: usize, mode: Mode) -> Result<Tensor> {
        let mut shapes = Vec::with_capacity(top + 1);
        let mut h = x.clone();
        for i in 0..=top {
            shapes.push(h.dims().to_vec());
            h = self.encode_stage(i, &h, mode)?;
        }
        for i in (0..=top).rev() {
            h = self.decode_stage(i, &h, &shapes[i], mode)?;
        }
        Ok(h)
    }

    /// The codes of the top stage and the full reconstruction, for end-to-end fine-tuning.
    pub fn forward_all(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let top = self.stages() - 1;
        let mut shapes = Vec::with_capacity(top + 1);
        let mut h = x.clone();
        for i in 0..=top {
            shapes.push(h.dims().to_vec());
            h = self.encode_stage(i, &h, mode)?;
        }
        let code = h.clone();
        for i in (0..=top).rev() {
            h = self.decode_stage(i, &h, &shapes[i], mode)?;
        }
        Ok((code, h))
    }

    /// The encoder's tensors only (keys as a classifier's backbone has them).
    pub fn encoder_tensors(&self) -> std::collections::HashMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .filter(|(k, _)| !k.starts_with(&format!("{DECODER_PREFIX}.")))
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Bernoulli-Bernoulli RBM stage `i` (dense, tied, sigmoid): hidden probabilities `p(h = 1 | v)`.
    pub fn rbm_hidden(&self, i: usize, v: &Tensor, mode: Mode) -> Result<Tensor> {
        self.encode_stage(i, v, mode)
    }

    /// Visible probabilities `p(v = 1 | h)` of RBM stage `i`, flat `[N, visible]`.
    pub fn rbm_visible(&self, i: usize, h: &Tensor, mode: Mode) -> Result<Tensor> {
        let w = mode.weight(self.encoder_weight(i));
        let b = mode.weight(&self.decoder[i].bias);
        Ok(candle_nn::ops::sigmoid(&h.matmul(&w)?.broadcast_add(&b)?)?)
    }

    /// Mean free energy `F(v) = -v·b - Σ_j softplus((v Wᵀ + c)_j)` of RBM stage `i` over the batch `v`
    /// `[N, visible]`. The gradient of `F(data) - F(model samples)` is the contrastive-divergence update.
    pub fn rbm_free_energy(&self, i: usize, v: &Tensor) -> Result<Tensor> {
        let Encoder::Dense(e) = &self.encoder else {
            return Err(Error::config("--method rbm", "RBMs are dense stages"));
        };
        let pre = e.stages[i].linear(v, Mode::Train)?;
        let vb = v
            .broadcast_mul(&self.decoder[i].bias.unsqueeze(0)?)?
            .sum(D::Minus1)?;
        let hidden = softplus(&pre)?.sum(D::Minus1)?;
        Ok((vb + hidden)?.neg()?.mean_all()?)
    }
}

/// `log(1 + e^x)`, computed stably as `max(x, 0) + log(1 + e^-|x|)`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(arch: &str, tied: bool) -> StackedAutoencoder {
        StackedAutoencoder::new(EncoderConfig::parse(arch).unwrap(), tied, &Device::Cpu).unwrap()
    }

    #[test]
    fn tied_weights_share_storage_and_have_no_decoder_weight() {
        for arch in ["dense:16,8,4", "conv:4,6"] {
            let m = model(arch, true);
            let keys: Vec<String> = m.varmap.data().lock().unwrap().keys().cloned().collect();
            assert!(
                !keys.iter().any(|k| k.ends_with("decoder.stage1.weight")),
                "{keys:?}"
            );
            assert!(keys.contains(&"decoder.stage1.bias".to_string()));
            // One tensor, not a copy: same id and same storage.
            assert_eq!(m.decoder_weight(0).id(), m.encoder_weight(0).id());
            // A gradient through the decoder alone reaches the encoder's variable.
            let h = Tensor::ones((2, m.config.widths()[1]), DType::F32, &Device::Cpu).unwrap();
            let h = if m.config.is_dense() {
                h
            } else {
                h.reshape((2, 4, 1, 1))
                    .unwrap()
                    .repeat((1, 1, 2, 2))
                    .unwrap()
            };
            let target: Vec<usize> = if m.config.is_dense() {
                vec![2, 16]
            } else {
                vec![2, 1, 4, 4]
            };
            let y = m.decode_stage(0, &h, &target, Mode::Train).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(m.encoder_weight(0)).is_some(), "{arch}");
        }
        let untied = model("dense:16,8", false);
        assert_ne!(untied.decoder_weight(0).id(), untied.encoder_weight(0).id());
        assert_eq!(untied.decoder_weight(0).dims(), &[16, 8]);
    }

    #[test]
    fn reconstructions_have_the_input_shape_and_pixel_range() {
        let x = Tensor::rand(0f32, 1f32, (3, 1, 28, 28), &Device::Cpu).unwrap();
        for arch in ["dense:784,32,16", "conv:4,6,8", "dense:784,20:tanh"] {
            for tied in [false, true] {
                let m = model(arch, tied);
                let r = m.reconstruct(&x, m.stages() - 1, Mode::Eval).unwrap();
                assert_eq!(r.dims(), x.dims(), "{arch}");
                let lo = r.min_all().unwrap().to_scalar::<f32>().unwrap();
                let hi = r.max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(lo >= 0.0 && hi <= 1.0, "{arch}: {lo}..{hi}");
            }
        }
    }

    #[test]
    fn transposed_convolution_gradients_match_finite_differences() {
        // candle's conv-transpose backward, checked numerically in f64 on a tiny case with output padding.
        let dev = Device::Cpu;
        let x = Tensor::rand(-1f64, 1f64, (1, 2, 3, 3), &dev).unwrap();
        let w =
            candle_core::Var::from_tensor(&Tensor::rand(-1f64, 1f64, (2, 3, 3, 3), &dev).unwrap())
                .unwrap();
        let f = |w: &Tensor| -> Tensor {
            x.conv_transpose2d(w, 1, 1, 2, 1)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let y = f(w.as_tensor());
        assert_eq!(
            x.conv_transpose2d(w.as_tensor(), 1, 1, 2, 1)
                .unwrap()
                .dims(),
            &[1, 3, 6, 6]
        );
        let g = y
            .backward()
            .unwrap()
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap();
        let g = g.to_vec1::<f64>().unwrap();
        let base = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        for k in [0, 7, 20, 40, 53] {
            let mut p = base.clone();
            p[k] += eps;
            let plus = f(&Tensor::from_vec(p.clone(), (2, 3, 3, 3), &dev).unwrap());
            p[k] -= 2.0 * eps;
            let minus = f(&Tensor::from_vec(p, (2, 3, 3, 3), &dev).unwrap());
            let num = (plus.to_scalar::<f64>().unwrap() - minus.to_scalar::<f64>().unwrap())
                / (2.0 * eps);
            assert!(
                (num - g[k]).abs() < 1e-5 * (1.0 + num.abs()),
                "{k}: {num} vs {}",
                g[k]
            );
        }
    }

    #[test]
    fn free_energy_gradient_is_the_contrastive_divergence_update() {
        // d/dW [F(v0) - F(v1)] = -(p(h|v0)ᵀ v0 - p(h|v1)ᵀ v1) / N, Hinton's CD rule.
        let m = model("dense:6,4:sigmoid", true);
        let dev = Device::Cpu;
        let v0 = Tensor::rand(0f32, 1f32, (5, 6), &dev).unwrap();
        let v1 = Tensor::rand(0f32, 1f32, (5, 6), &dev).unwrap();
        let loss =
            (m.rbm_free_energy(0, &v0).unwrap() - m.rbm_free_energy(0, &v1).unwrap()).unwrap();
        let g = loss
            .backward()
            .unwrap()
            .get(m.encoder_weight(0))
            .unwrap()
            .clone();
        let h0 = m.rbm_hidden(0, &v0, Mode::Frozen).unwrap();
        let h1 = m.rbm_hidden(0, &v1, Mode::Frozen).unwrap();
        let pos = h0.t().unwrap().matmul(&v0).unwrap();
        let neg = h1.t().unwrap().matmul(&v1).unwrap();
        let expected = ((neg - pos).unwrap() / 5.0).unwrap();
        let diff = (g - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}

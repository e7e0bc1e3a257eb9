//! The Vision Transformer (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021, the same network trained
//! differently) in timm's key layout (`timm.models.vision_transformer.VisionTransformer`), so a timm
//! `model.safetensors` (the hub's `timm/vit_small_patch16_224.augreg_in21k_ft_in1k`,
//! `timm/deit_small_patch16_224.fb_in1k`) loads strictly:
//!
//! * `patch_embed.proj` (a PxP stride-P convolution with bias: one D-wide token per patch), `cls_token`
//!   `[1, 1, D]`, `pos_embed` `[1, 1 + N, D]` (the class token's position first, then the patch grid row by
//!   row);
//! * `blocks.B.norm1`, `.attn.qkv` (`[3D, D]`, with bias), `.attn.proj`, `.norm2`, `.mlp.fc1` (D -> 4D),
//!   `.mlp.fc2`, pre-norm residual blocks `x + attn(norm1(x))`, `x + mlp(norm2(x))`;
//! * `norm` (the final LayerNorm) and the classifier `head`.
//!
//! Attention splits `qkv(x)` as timm does (`[B, N, 3, H, D/H]`, permuted to `[3, B, H, N, D/H]`) and computes
//! `softmax(q k^T / sqrt(D/H)) v`; the MLP's GELU is exact (erf), as `nn.GELU`; LayerNorm eps is 1e-6. There
//! is no layer scale, no pre-norm and no fc_norm: timm's defaults for these models.
//!
//! Another input size (a multiple of the patch or not: the convolution drops the remainder) gets the patch
//! grid's position embeddings resampled as timm's `resample_abs_pos_embed` does (`dynamic_img_size=True`):
//! bicubic, `align_corners=False`, antialiased (timm's default, so PIL's bicubic filter, see
//! [`bicubic_weights`]), the class token's embedding kept. The resampling is
//! linear in the embeddings, so it runs as two small matrix products (rows, then columns) whose weights
//! [`bicubic_weights`] computes on the CPU: it is differentiable, so fine-tuning at 160 pixels still trains
//! the 224-pixel `pos_embed`, and it costs two `[out, in]` matrices per forward, too little to cache.
//!
//! Training differs from inference only by stochastic depth ([`VitConfig::drop_path`], rising linearly
//! from 0 at the first block to the rate at the last, as timm's `drop_path_rate`).
//!
//! Layer groups, in forward order: `embed` (patch embedding, class token, position embeddings),
//! `blocks1` .. `blocksK` (the blocks split evenly into [`VitConfig::block_groups`] runs, 4 for the
//! shipped models: 3 blocks each), `norm` (the final norm and the class token: this last group already
//! returns `[N, D]` vectors, as ConvNeXt's `head_norm`, so freezing the whole backbone also freezes the
//! norm the classifier reads, and the feature cache stays exact).

use super::convnext::{dense, layer_norm, Dense, LayerNorm};
use super::layers::{conv2d, drop_path, Conv2d, Conv2dConfig};
use super::{Backbone, Mode};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::init::Init;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The shape of a Vision Transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub arch: String,
    /// Side of the square patches (and stride of the patch embedding).
    pub patch: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads (D must be a multiple).
    pub heads: usize,
    /// MLP hidden width over D (timm's `mlp_ratio`; the hidden width is `int(D * mlp_ratio)`).
    pub mlp_ratio: f64,
    /// The image size the position embeddings are for (`pos_embed` has `(img_size / patch)^2 + 1` rows).
    pub img_size: usize,
    /// Layer groups the blocks are split into (graft's choice, not timm's): each group gets its own
    /// learning rate and can be frozen on its own.
    pub block_groups: usize,
    /// Stochastic-depth rate of the last block in training (timm's `drop_path_rate`, default 0).
    #[serde(default)]
    pub drop_path: f32,
}

impl VitConfig {
    /// timm's `vit_small_patch16_224` and `deit_small_patch16_224` (the same network: patch 16, width 384,
    /// 12 blocks of 6 heads, MLP ratio 4, 224 pixels, class-token pooling).
    pub fn from_arch(arch: &str) -> Result<Self> {
        match arch {
            "vit_small_patch16_224" | "deit_small_patch16_224" => Ok(Self {
                arch: arch.to_string(),
                patch: 16,
                embed_dim: 384,
                depth: 12,
                heads: 6,
                mlp_ratio: 4.0,
                img_size: 224,
                block_groups: 4,
                drop_path: 0.0,
            }),
            other => Err(Error::config(
                "vit arch",
                format!("`{other}` is not one of: vit_small_patch16_224, deit_small_patch16_224"),
            )),
        }
    }

    /// True for the architecture names [`VitConfig::from_arch`] knows.
    pub fn is_arch(arch: &str) -> bool {
        arch.starts_with("vit_") || arch.starts_with("deit_")
    }

    fn grid(&self) -> usize {
        self.img_size / self.patch
    }

    fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// The blocks of group `g` (0-based among the block groups): an even split, earlier groups one longer
    /// when the depth does not divide.
    fn blocks_of_group(&self, g: usize) -> std::ops::Range<usize> {
        let start = |g: usize| g * self.depth / self.block_groups;
        start(g)..start(g + 1)
    }

    fn group_of_block(&self, b: usize) -> usize {
        (0..self.block_groups)
            .find(|&g| self.blocks_of_group(g).contains(&b))
            .expect("checked: a block index below depth")
    }

    fn check(&self) -> Result<()> {
        let bad =
            |what: &str, why: String| Err(Error::config(format!("{} {what}", self.arch), why));
        if self.patch == 0 || self.img_size < self.patch {
            return bad(
                "patch",
                format!(
                    "patch {} does not fit the image size {}",
                    self.patch, self.img_size
                ),
            );
        }
        if self.embed_dim == 0 || self.heads == 0 || !self.embed_dim.is_multiple_of(self.heads) {
            return bad(
                "heads",
                format!(
                    "{} heads do not divide the width {}",
                    self.heads, self.embed_dim
                ),
            );
        }
        if self.depth == 0 || self.block_groups == 0 || self.block_groups > self.depth {
            return bad(
                "block_groups",
                format!(
                    "{} block groups for {} blocks (need 1..=depth)",
                    self.block_groups, self.depth
                ),
            );
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_hidden() > 0) {
            return bad("mlp_ratio", format!("{} is not positive", self.mlp_ratio));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return bad("drop_path", format!("{} is not in [0, 1)", self.drop_path));
        }
        Ok(())
    }
}

/// The `[out_len, in_len]` matrix (row-major) of PyTorch's 1-D antialiased bicubic interpolation
/// (`F.interpolate(mode="bicubic", align_corners=False, antialias=True)` with an output size), which timm's
/// `resample_abs_pos_embed` uses by default. That is PIL's filter, not the plain bicubic one: Keys' cubic
/// kernel with A = -0.5, centred on `(i + 0.5) * in_len / out_len`, stretched by the scale when shrinking
/// (so every input contributes), its taps cut at the edges and the weights of each output normalised to sum
/// to 1 (`aten/src/ATen/native/cpu/UpSampleKernel.cpp`, `_compute_index_ranges_weights` and
/// `HelperInterpCubic::aa_filter`). A 2-D resize is this along rows, then along columns.
pub fn bicubic_weights(in_len: usize, out_len: usize) -> Vec<f64> {
    const A: f64 = -0.5;
    let filter = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
        } else {
            0.0
        }
    };
    let scale = in_len as f64 / out_len as f64;
    let (support, stretch) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let mut w = vec![0.0; out_len * in_len];
    for i in 0..out_len {
        let centre = scale * (i as f64 + 0.5);
        // PyTorch truncates toward zero (a cast), then clamps to the input.
        let lo = ((centre - support + 0.5) as i64).max(0) as usize;
        let hi = ((centre + support + 0.5) as i64).min(in_len as i64) as usize;
        let row = &mut w[i * in_len..(i + 1) * in_len];
        for (j, r) in row.iter_mut().enumerate().take(hi).skip(lo) {
            *r = filter((j as f64 - centre + 0.5) * stretch);
        }
        let total: f64 = row.iter().sum();
        if total != 0.0 {
            row.iter_mut().for_each(|r| *r /= total);
        }
    }
    w
}

/// `[rows_out, rows_in]` interpolation weights as a tensor like `like`.
fn weights_tensor(in_len: usize, out_len: usize, like: &Tensor) -> Result<Tensor> {
    let w = Tensor::from_vec(
        bicubic_weights(in_len, out_len),
        (out_len, in_len),
        like.device(),
    )?;
    Ok(w.to_dtype(like.dtype())?)
}

/// Resamples a `[gh * gw, D]` grid of embeddings (row by row) to `[oh * ow, D]`, bicubically.
fn resample_grid(grid: &Tensor, from: (usize, usize), to: (usize, usize)) -> Result<Tensor> {
    let ((gh, gw), (oh, ow)) = (from, to);
    let d = grid.dim(1)?;
    // Rows: [oh, gh] x [gh, gw * D].
    let h = weights_tensor(gh, oh, grid)?.matmul(&grid.reshape((gh, gw * d))?)?;
    // Columns: [ow, gw] x [gw, oh * D], with the columns brought to the front.
    let h = h.reshape((oh, gw, d))?.transpose(0, 1)?.contiguous()?;
    let h = weights_tensor(gw, ow, grid)?.matmul(&h.reshape((gw, oh * d))?)?;
    Ok(h.reshape((ow, oh, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((oh * ow, d))?)
}

/// Multi-head self-attention, keys `qkv` and `proj`.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Dense,
    proj: Dense,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x, mode)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.get(i)?.contiguous()?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (hd as f64).powf(-0.5))?;
        let attn = crate::kernels::softmax_last_dim(&scores)?;
        let y = attn
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, c))?;
        self.proj.forward(&y, mode)
    }
}

/// One pre-norm transformer block: `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    drop_path: f32,
}

impl Block {
    fn new(cfg: &VitConfig, drop_path: f32, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let avb = vb.pp("attn");
        let mvb = vb.pp("mlp");
        Ok(Self {
            norm1: layer_norm(d, vb.pp("norm1"))?,
            attn: Attention {
                qkv: dense(d, 3 * d, false, avb.pp("qkv"))?,
                proj: dense(d, d, false, avb.pp("proj"))?,
                heads: cfg.heads,
            },
            norm2: layer_norm(d, vb.pp("norm2"))?,
            fc1: dense(d, cfg.mlp_hidden(), false, mvb.pp("fc1"))?,
            fc2: dense(cfg.mlp_hidden(), d, false, mvb.pp("fc2"))?,
            drop_path,
        })
    }

    fn residual(&self, x: &Tensor, branch: Tensor, mode: Mode) -> Result<Tensor> {
        let branch = if mode.is_train() && self.drop_path > 0. {
            drop_path(&branch, self.drop_path)?
        } else {
            branch
        };
        Ok((x + branch)?)
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self
            .attn
            .forward(&self.norm1.forward_last(x, mode)?, mode)?;
        let x = self.residual(x, h, mode)?;
        let h = self
            .fc1
            .forward(&self.norm2.forward_last(&x, mode)?, mode)?;
        let h = self.fc2.forward(&crate::kernels::gelu(&h)?, mode)?;
        self.residual(&x, h, mode)
    }
}

/// A Vision Transformer backbone (embedding, blocks, final norm); the classifier `head` is built
/// separately.
#[derive(Debug, Clone)]
pub struct Vit {
    cfg: VitConfig,
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Vit {
    /// Builds the backbone from `vb` (the root of timm's key layout).
    pub fn new(cfg: VitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let d = cfg.embed_dim;
        let proj_cfg = Conv2dConfig {
            padding: 0,
            stride: cfg.patch,
            groups: 1,
            bias: true,
        };
        let patch_embed = conv2d(3, d, cfg.patch, proj_cfg, vb.pp("patch_embed").pp("proj"))?;
        // timm: cls_token normal(std=1e-6), pos_embed trunc_normal(std=.02).
        let cls_token = vb.get_with_hints(
            (1, 1, d),
            "cls_token",
            Init::Randn {
                mean: 0.,
                stdev: 1e-6,
            },
        )?;
        let tokens = cfg.grid() * cfg.grid() + 1;
        let pos_embed = vb.get_with_hints(
            (1, tokens, d),
            "pos_embed",
            Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        )?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for b in 0..cfg.depth {
            // timm: torch.linspace(0, drop_path_rate, depth).
            let rate = if cfg.depth > 1 {
                cfg.drop_path * b as f32 / (cfg.depth - 1) as f32
            } else {
                0.
            };
            blocks.push(Block::new(&cfg, rate, vb.pp("blocks").pp(b))?);
        }
        let norm = layer_norm(d, vb.pp("norm"))?;
        Ok(Self {
            cfg,
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// The position embeddings `[1, 1 + gh * gw, D]` for a `gh` x `gw` patch grid: the stored ones at the
    /// configured size, else the grid part resampled bicubically (the class token's row kept).
    fn pos_embed_for(&self, gh: usize, gw: usize, mode: Mode) -> Result<Tensor> {
        let pos = mode.weight(&self.pos_embed);
        let g = self.cfg.grid();
        if (gh, gw) == (g, g) {
            return Ok(pos);
        }
        let d = self.cfg.embed_dim;
        let cls = pos.narrow(1, 0, 1)?;
        let grid = pos.narrow(1, 1, g * g)?.reshape((g * g, d))?;
        let grid = resample_grid(&grid, (g, g), (gh, gw))?.reshape((1, gh * gw, d))?;
        Ok(Tensor::cat(&[&cls, &grid], 1)?)
    }

    /// Images `[B, 3, H, W]` to tokens `[B, 1 + N, D]`: class token, then patches, plus positions.
    fn embed(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let p = self.patch_embed.forward(x, mode)?;
        let (b, d, gh, gw) = p.dims4()?;
        let patches = p.reshape((b, d, gh * gw))?.transpose(1, 2)?;
        let cls = mode.weight(&self.cls_token).broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        Ok(tokens.broadcast_add(&self.pos_embed_for(gh, gw, mode)?)?)
    }
}

impl Backbone for Vit {
    fn arch(&self) -> &str {
        &self.cfg.arch
    }

    fn group_names(&self) -> Vec<String> {
        let mut names = vec!["embed".to_string()];
        names.extend((1..=self.cfg.block_groups).map(|i| format!("blocks{i}")));
        names.push("norm".into());
        names
    }

    fn group_of(&self, key: &str) -> Option<usize> {
        let mut parts = key.split('.');
        match parts.next()? {
            "patch_embed" | "cls_token" | "pos_embed" => Some(0),
            "blocks" => {
                let b: usize = parts.next()?.parse().ok()?;
                (b < self.cfg.depth).then(|| 1 + self.cfg.group_of_block(b))
            }
            "norm" => Some(self.cfg.block_groups + 1),
            _ => None,
        }
    }

    /// timm's layer ids for ViT (`group_matcher(coarse=False)`): the embedding 0, block `i` `i + 1`, the
    /// final norm with the last block; the head is `depth + 1`.
    fn decay_layer(&self, key: &str) -> Option<usize> {
        let g = self.group_of(key)?;
        if g == 0 {
            return Some(0);
        }
        match key.split('.').nth(1).and_then(|b| b.parse::<usize>().ok()) {
            Some(b) if key.starts_with("blocks.") => Some(b + 1),
            _ => Some(self.cfg.depth),
        }
    }

    fn decay_layers(&self) -> usize {
        self.cfg.depth + 1
    }

    fn feature_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    fn classifier_prefix(&self) -> &str {
        "head"
    }

    fn forward_group(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let groups = self.cfg.block_groups;
        if i == 0 {
            self.embed(x, mode)
        } else if i <= groups {
            let mut h = x.clone();
            for b in self.cfg.blocks_of_group(i - 1) {
                h = self.blocks[b].forward(&h, mode)?;
            }
            Ok(h)
        } else if i == groups + 1 {
            // timm's forward_head with global_pool='token': the class token after the final norm.
            let h = self.norm.forward_last(x, mode)?;
            Ok(h.narrow(1, 0, 1)?.squeeze(1)?)
        } else {
            Err(Error::config(
                "vit group",
                format!("index {i} out of range 0..{}", groups + 2),
            ))
        }
    }

    /// The last group (`norm`) already pools: its output is the feature vector.
    fn pool(&self, h: &Tensor) -> Result<Tensor> {
        match h.rank() {
            2 => Ok(h.clone()),
            _ => Ok(h.narrow(1, 0, 1)?.squeeze(1)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn tiny(img_size: usize, drop_path: f32) -> VitConfig {
        VitConfig {
            arch: "vit_test".into(),
            patch: 8,
            embed_dim: 16,
            depth: 3,
            heads: 2,
            mlp_ratio: 4.0,
            img_size,
            block_groups: 2,
            drop_path,
        }
    }

    #[test]
    fn vit_small_has_timms_keys_shapes_and_groups() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = Vit::new(VitConfig::from_arch("vit_small_patch16_224").unwrap(), vb).unwrap();
        let data = varmap.data().lock().unwrap();
        let shape = |k: &str| data[k].as_tensor().dims().to_vec();
        assert_eq!(shape("patch_embed.proj.weight"), vec![384, 3, 16, 16]);
        assert_eq!(shape("cls_token"), vec![1, 1, 384]);
        assert_eq!(shape("pos_embed"), vec![1, 197, 384]);
        assert_eq!(shape("blocks.11.attn.qkv.weight"), vec![1152, 384]);
        assert_eq!(shape("blocks.0.mlp.fc1.weight"), vec![1536, 384]);
        // timm's vit_small_patch16_224 has 22,050,664 parameters with its 1000-way head.
        let backbone: usize = data.values().map(|v| v.elem_count()).sum();
        assert_eq!(backbone + 384 * 1000 + 1000, 22_050_664);
        assert_eq!(net.group_names().len(), 6);
        assert_eq!(net.group_of("pos_embed"), Some(0));
        assert_eq!(net.group_of("blocks.2.attn.qkv.bias"), Some(1));
        assert_eq!(net.group_of("blocks.3.norm1.weight"), Some(2));
        assert_eq!(net.group_of("blocks.11.mlp.fc2.weight"), Some(4));
        assert_eq!(net.group_of("norm.bias"), Some(5));
        assert_eq!(net.group_of("head.weight"), None);
        // timm 1.0.31's param_groups_layer_decay map of vit_small_patch16_224 (head: 13).
        assert_eq!(net.decay_layers(), 13);
        for (key, layer) in [
            ("cls_token", 0),
            ("patch_embed.proj.weight", 0),
            ("blocks.0.norm1.weight", 1),
            ("blocks.11.mlp.fc2.bias", 12),
            ("norm.weight", 12),
        ] {
            assert_eq!(net.decay_layer(key), Some(layer), "{key}");
        }
        assert_eq!(net.decay_layer("head.weight"), None);
    }

    #[test]
    fn uneven_depths_split_into_contiguous_groups() {
        let mut cfg = tiny(32, 0.);
        cfg.depth = 7;
        cfg.block_groups = 3;
        let runs: Vec<_> = (0..3).map(|g| cfg.blocks_of_group(g)).collect();
        assert_eq!(runs, vec![0..2, 2..4, 4..7]);
        assert_eq!(cfg.group_of_block(4), 2);
    }

    /// Expected rows from torch 2.15: `F.interpolate(torch.eye(4)[None, None].double(), size=(4, n),
    /// mode="bicubic", align_corners=False, antialias=True)[0, 0].T`, for n = 3 (row 0) and 6 (row 2).
    #[test]
    fn bicubic_weights_are_pytorchs_antialiased_ones() {
        let close = |got: &[f64], want: &[f64]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-11, "{got:?} vs {want:?}");
            }
        };
        let shrink = bicubic_weights(4, 3);
        close(
            &shrink[0..4],
            &[0.752860411899, 0.304347826087, -0.057208237986, 0.0],
        );
        let grow = bicubic_weights(4, 6);
        close(
            &grow[8..12],
            &[-0.057870370370, 0.9375, 0.131944444444, -0.011574074074],
        );
        // The same size is the identity.
        let id = bicubic_weights(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert!((id[i * 5 + j] - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn other_input_sizes_resample_the_positions_and_drop_path_only_acts_in_training() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = Vit::new(tiny(32, 0.5), vb).unwrap();
        for size in [32, 48, 24] {
            let x = Tensor::randn(0f32, 1., (2, 3, size, size), &Device::Cpu).unwrap();
            let a = net.forward_features(&x, Mode::Eval, 0).unwrap();
            assert_eq!(a.dims(), &[2, 16]);
            let b = net.forward_features(&x, Mode::Frozen, 4).unwrap();
            let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.);
            let t = net.forward_features(&x, Mode::Train, 0).unwrap();
            let diff = (&a - &t).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() > 0.);
        }
        // The resampled grid is a function of the stored one: gradients reach pos_embed.
        let x = Tensor::randn(0f32, 1., (2, 3, 48, 48), &Device::Cpu).unwrap();
        let loss = net
            .forward_features(&x, Mode::Eval, 0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(&net.pos_embed).unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.);
    }
}

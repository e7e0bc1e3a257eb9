//! Reconstruction grids: a row of original images above the row of their reconstructions, as one PNG.

use crate::{Error, Result};
use candle_core::Tensor;
use image::{Rgb, RgbImage};
use std::path::Path;

/// Images shown per grid.
pub const GRID_IMAGES: usize = 8;
/// Each pixel is drawn as a `SCALE` x `SCALE` block, so 28x28 images stay readable.
const SCALE: u32 = 4;
const GAP: u32 = 4;

/// Writes `originals` (top row) and `recons` (bottom row), both `[N, C, H, W]` with values in [0, 1]
/// (C = 1 or 3), to `path` as a PNG.
pub fn write_grid(originals: &Tensor, recons: &Tensor, path: &Path) -> Result<()> {
    let (n, c, h, w) = originals.dims4()?;
    if recons.dims() != originals.dims() {
        return Err(Error::config(
            "reconstruction grid",
            format!(
                "shapes differ: {:?} vs {:?}",
                originals.dims(),
                recons.dims()
            ),
        ));
    }
    let (cw, ch) = (w as u32 * SCALE, h as u32 * SCALE);
    let width = n as u32 * (cw + GAP) + GAP;
    let height = 2 * (ch + GAP) + GAP;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (row, t) in [originals, recons].into_iter().enumerate() {
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for k in 0..n {
            let (x0, y0) = (GAP + k as u32 * (cw + GAP), GAP + row as u32 * (ch + GAP));
            for y in 0..h {
                for x in 0..w {
                    let px = |ci: usize| {
                        let i = ((k * c + ci) * h + y) * w + x;
                        (v[i].clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    let rgb = if c == 3 {
                        Rgb([px(0), px(1), px(2)])
                    } else {
                        Rgb([px(0); 3])
                    };
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            img.put_pixel(
                                x0 + x as u32 * SCALE + dx,
                                y0 + y as u32 * SCALE + dy,
                                rgb,
                            );
                        }
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::fsutil::write_atomic(path, &bytes)
}

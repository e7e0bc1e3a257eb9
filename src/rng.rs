//! Seeded random number generators whose exact position can be saved and restored.
//!
//! Every source of randomness in training that affects the result after a resume (dropout masks, data order,
//! augmentation) draws from a [`ChaCha8Rng`] owned by graft, never from a thread RNG or candle's unseeded device
//! RNG, so that a resumed run continues the stream where the interrupted run stopped. ChaCha is a counter-based
//! generator: seed, stream and word position describe its state completely, and [`RngState`] stores exactly
//! those three.

use crate::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// SplitMix64's finaliser: derives independent seeds from (seed, epoch, position, ...) combinations.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A standard normal sample by the Box-Muller transform (rand_distr is not a dependency): two uniform draws.
pub fn standard_normal<R: rand::Rng + ?Sized>(rng: &mut R) -> f64 {
    // 1 - u lies in (0, 1], so the log is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A generator seeded from a `u64` run seed.
pub fn seeded(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The complete position of a [`ChaCha8Rng`], as plain JSON-friendly data.
///
/// `seed` is 64 hex digits (the 32-byte key); `word_pos` is a decimal string because it is a `u128`, which JSON
/// numbers cannot hold exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    pub word_pos: String,
}

impl RngState {
    /// Captures where `rng` stands now.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        let seed = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        RngState {
            seed,
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// A generator that continues exactly where the captured one stood.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        let bad = |reason: &str| Error::state("rng state", reason.to_string());
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad("seed must be 64 hex digits"));
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("seed must be 64 hex digits"))?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| bad("word_pos must be a decimal integer"))?;
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn restored_generator_continues_the_same_stream() {
        let mut rng = seeded(7);
        for _ in 0..13 {
            rng.random::<u32>();
        }
        let state = RngState::of(&rng);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = serde_json::from_str::<RngState>(&json)
            .unwrap()
            .restore()
            .unwrap();
        let expected: Vec<u64> = (0..20).map(|_| rng.random()).collect();
        let got: Vec<u64> = (0..20).map(|_| restored.random()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut state = RngState::of(&seeded(1));
        state.seed = "zz".repeat(32);
        assert!(state.restore().is_err());
        let mut state = RngState::of(&seeded(1));
        state.word_pos = "-3".into();
        assert!(state.restore().is_err());
    }
}

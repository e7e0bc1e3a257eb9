//! TensorBoard event files, written by graft itself: the run's scalars (per-step loss and learning rate,
//! per-epoch metrics) as TensorBoard reads them, with no TensorFlow or protobuf dependency.
//!
//! The format: a file `events.out.tfevents.<unix seconds>.<host>` of TFRecords (a little-endian u64 length,
//! its masked CRC-32C, the bytes, their masked CRC-32C), each an `Event` protocol buffer. The first event
//! carries `file_version = "brain.Event:2"`; every other a `Summary` with one `simple_value` per tag. A resumed
//! run starts a new file in the same folder; TensorBoard reads all the files of a folder as one run.

use crate::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), as TFRecord uses it; table-driven.
fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: rotated and offset so that a CRC of data holding CRCs stays well spread.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn bytes_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event` with `wall_time`, `step` and either `file_version` or a summary of `(tag, value)` scalars.
fn event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    varint(1 << 3 | 1, &mut e); // wall_time: double
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut e); // step: int64
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v); // Summary.Value.tag
            varint(2 << 3 | 5, &mut v); // simple_value: float
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary); // Summary.value
        }
        bytes_field(5, &summary, &mut e); // Event.summary
    }
    e
}

/// Unix seconds now.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One event file being written.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Starts a new event file in `dir` (created if needed).
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let t = now();
        // Seconds plus the process id: two files started in one second (a quick resume) do not collide.
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            t as u64,
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.record(&event(t, 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out
            .write_all(&rec)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Scalars at `step`; non-finite values are left out (TensorBoard would draw them as gaps anyway).
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let values: Vec<(&str, f32)> = scalars
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|&(t, v)| (t, v as f32))
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.record(&event(now(), step as i64, None, &values))
    }

    /// Pushes what was written to the file (at the end of each epoch).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value (RFC 3720, iSCSI) of "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn a_scalar_event_encodes_as_protobuf() {
        let e = event(1.5, 7, None, &[("loss", 0.25)]);
        // wall_time (field 1, fixed64), step (field 2, varint 7), summary (field 5).
        assert_eq!(e[0], 0x09);
        assert_eq!(&e[1..9], &1.5f64.to_le_bytes());
        assert_eq!(&e[9..11], &[0x10, 7]);
        assert_eq!(e[11], 0x2A);
        let tail = &e[e.len() - 4..];
        assert_eq!(tail, &0.25f32.to_le_bytes());
    }
}

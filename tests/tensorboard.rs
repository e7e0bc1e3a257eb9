//! TensorBoard event files of a run, read back with a parser written here from the format's description
//! (TFRecord framing with masked CRC-32C, `Event` and `Summary` protocol buffers), independent of graft's
//! writer: every record's checksums hold, the first event is the file version, and the scalars are the
//! run's: one `train/loss` and `train/lr` per optimizer step, the epoch metrics equal to metrics.jsonl.

mod common;

use common::{graft_ok, make_folder};
use std::collections::BTreeMap;
use std::path::Path;

fn crc32c(bytes: &[u8]) -> u32 {
    // Bitwise (no table): a different implementation from the writer's.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

fn masked(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// The fields of a protobuf message: (field number, wire type, payload bytes or the varint as bytes).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

/// (step, tag, value) of every scalar, and the file version, of all event files in `dir`.
fn read_events(dir: &Path) -> (Vec<String>, Vec<(i64, String, f32)>) {
    let (mut versions, mut scalars) = (Vec::new(), Vec::new());
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let b = std::fs::read(&file).unwrap();
        let mut i = 0;
        while i < b.len() {
            let len_bytes = &b[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap()),
                masked(len_bytes)
            );
            let data = &b[i + 12..i + 12 + len];
            let crc = u32::from_le_bytes(b[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked(data), "record at byte {i} of {name}");
            i += 16 + len;
            let mut step = 0i64;
            for (field, _, payload) in fields(data) {
                match field {
                    2 => step = i64::from_le_bytes(payload[..8].try_into().unwrap()),
                    3 => versions.push(String::from_utf8(payload).unwrap()),
                    5 => {
                        for (_, _, value) in fields(&payload) {
                            let (mut tag, mut v) = (String::new(), f32::NAN);
                            for (f, _, p) in fields(&value) {
                                match f {
                                    1 => tag = String::from_utf8(p).unwrap(),
                                    2 => v = f32::from_le_bytes(p[..4].try_into().unwrap()),
                                    _ => {}
                                }
                            }
                            scalars.push((step, tag, v));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    (versions, scalars)
}

#[test]
fn a_run_writes_tensorboard_events_that_a_reader_finds_whole_and_equal_to_its_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_folder(&data, &["a", "b"], 8);
    let run = tmp.path().join("run");
    let args = [
        "finetune",
        "--base",
        "dense:256,16",
        "--image-size",
        "16",
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        "4",
        "--freeze-epochs",
        "1",
        "--epochs",
        "2",
        "--quiet",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    graft_ok(&[&args[..], &["--stop-after", "1"]].concat());
    // A resumed run adds a second event file; TensorBoard reads the folder as one run.
    graft_ok(&["finetune", "--resume", run.to_str().unwrap(), "--quiet"]);
    let (versions, scalars) = read_events(&run.join("tensorboard"));
    assert_eq!(versions, ["brain.Event:2", "brain.Event:2"]);
    let by_tag = |tag: &str| -> BTreeMap<i64, f32> {
        scalars
            .iter()
            .filter(|s| s.1 == tag)
            .map(|s| (s.0, s.2))
            .collect()
    };
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 3);
    for key in ["train_loss", "val_loss", "train_acc", "val_acc", "lr"] {
        let logged = by_tag(&format!("epoch/{key}"));
        let expected: BTreeMap<i64, f32> = metrics
            .iter()
            .map(|m| {
                (
                    m["epoch"].as_i64().unwrap(),
                    m[key].as_f64().unwrap() as f32,
                )
            })
            .collect();
        assert_eq!(logged, expected, "epoch/{key}");
    }
    // One loss and one rate per step, steps 1.. without gaps or repeats across the resume.
    let (loss, lr) = (by_tag("train/loss"), by_tag("train/lr"));
    let steps: Vec<i64> = loss.keys().copied().collect();
    assert_eq!(steps, (1..=steps.len() as i64).collect::<Vec<_>>());
    assert_eq!(lr.len(), loss.len());
    assert_eq!(
        scalars.iter().filter(|s| s.1 == "train/loss").count(),
        loss.len()
    );
    assert!(loss.values().all(|v| v.is_finite() && *v > 0.0));
}

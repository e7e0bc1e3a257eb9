//! PyTorch checkpoints in both on-disk formats, written byte for byte the way `torch.save` writes them
//! (protocol-2 pickles with `torch._utils._rebuild_tensor_v2` and persistent ids for storages; see
//! torch/serialization.py), so the tests need neither Python nor torch. The real legacy file is checked
//! in tests/efficientnet_golden.rs.

use candle_core::{DType, Tensor};
use graft::formats::pth::{convert_to_safetensors, load_pth, PthFormat};
use graft::Error;
use std::io::Write;
use std::path::Path;

/// A pickle writer with just the opcodes torch emits.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Self {
        let mut b = vec![b'X'];
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
        self.op(&b)
    }
    fn int(self, i: u16) -> Self {
        if i < 256 {
            self.op(&[b'K', i as u8])
        } else {
            let [lo, hi] = i.to_le_bytes();
            self.op(&[b'M', lo, hi])
        }
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn ints(self, v: &[u16]) -> Self {
        let mut p = self.op(b"(");
        for &i in v {
            p = p.int(i);
        }
        p.op(b"t")
    }
    fn stop(self) -> Vec<u8> {
        self.op(b".").0
    }
}

/// One tensor entry of the state dict: a strided view of a storage.
struct Entry {
    name: &'static str,
    storage: &'static str,
    class: &'static str,
    numel: u16,
    offset: u16,
    size: &'static [u16],
    stride: &'static [u16],
}

/// The state dict every test writes. `w` is the transpose of storage 0 (non-contiguous), `b` a view at
/// an offset into the same storage, then one tensor per other dtype, a 0-d `num_batches_tracked`, and
/// one non-tensor entry.
const ENTRIES: &[Entry] = &[
    Entry {
        name: "w",
        storage: "0",
        class: "FloatStorage",
        numel: 6,
        offset: 0,
        size: &[3, 2],
        stride: &[1, 3],
    },
    Entry {
        name: "b",
        storage: "0",
        class: "FloatStorage",
        numel: 6,
        offset: 4,
        size: &[2],
        stride: &[1],
    },
    Entry {
        name: "h",
        storage: "1",
        class: "HalfStorage",
        numel: 2,
        offset: 0,
        size: &[2],
        stride: &[1],
    },
    Entry {
        name: "bn.num_batches_tracked",
        storage: "2",
        class: "LongStorage",
        numel: 1,
        offset: 0,
        size: &[],
        stride: &[],
    },
    Entry {
        name: "mask",
        storage: "3",
        class: "BoolStorage",
        numel: 3,
        offset: 0,
        size: &[3],
        stride: &[1],
    },
    Entry {
        name: "d",
        storage: "4",
        class: "DoubleStorage",
        numel: 4,
        offset: 0,
        size: &[2, 2],
        stride: &[2, 1],
    },
    Entry {
        name: "i",
        storage: "5",
        class: "IntStorage",
        numel: 2,
        offset: 0,
        size: &[2],
        stride: &[1],
    },
];

/// Raw little-endian bytes of each storage, by key.
fn storage_bytes(key: &str) -> Vec<u8> {
    match key {
        "0" => (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect(),
        "1" => [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        "2" => 7i64.to_le_bytes().to_vec(),
        "3" => vec![1, 0, 1],
        "4" => [1f64, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        "5" => [-3i32, 9].iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

const KEYS: [&str; 6] = ["0", "1", "2", "3", "4", "5"];

/// The pickled `OrderedDict` state dict; `legacy` selects the 6-field persistent id of the old format
/// (with `view_metadata = None`) over the 5-field one of the zip format. With `wrap`, the state dict
/// sits under `state_dict` next to an `epoch` entry, like a training checkpoint.
fn state_dict_pickle(legacy: bool, wrap: bool) -> Vec<u8> {
    let mut p = Pickle::new();
    if wrap {
        p = p.op(b"}q\x00(").str("epoch").int(3).str("state_dict");
    }
    p = p.global("collections", "OrderedDict").op(b")Rq\x01(");
    for e in ENTRIES {
        p = p
            .str(e.name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", e.class)
            .str(e.storage)
            .str("cpu")
            .int(e.numel);
        if legacy {
            p = p.op(b"N");
        }
        p = p
            .op(b"tQ")
            .int(e.offset)
            .ints(e.size)
            .ints(e.stride)
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R");
    }
    // A non-tensor entry, and the `_metadata` state torch attaches with BUILD.
    p = p.str("note").str("not a tensor").op(b"u");
    p = p
        .op(b"}")
        .str("_metadata")
        .global("collections", "OrderedDict")
        .op(b")R")
        .op(b"sb");
    if wrap {
        p = p.op(b"u");
    }
    p.stop()
}

fn write_zip(path: &Path, wrap: bool) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut put = |name: &str, data: &[u8]| {
        zip.start_file(format!("archive/{name}"), opts).unwrap();
        zip.write_all(data).unwrap();
    };
    put("data.pkl", &state_dict_pickle(false, wrap));
    put("byteorder", b"little");
    for key in KEYS {
        put(&format!("data/{key}"), &storage_bytes(key));
    }
    put("version", b"3\n");
    zip.finish().unwrap();
}

fn legacy_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    // magic number 0x1950a86a20f9469cfc6c as LONG1
    out.extend(
        Pickle::new()
            .op(&[
                0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
            ])
            .stop(),
    );
    out.extend(Pickle::new().int(1001).stop());
    let sys_info = Pickle::new()
        .op(b"}(")
        .str("protocol_version")
        .int(1001)
        .str("little_endian")
        .op(&[0x88])
        .op(b"u");
    out.extend(sys_info.stop());
    out.extend(state_dict_pickle(true, false));
    let mut keys = Pickle::new().op(b"](");
    for k in KEYS {
        keys = keys.str(k);
    }
    out.extend(keys.op(b"e").stop());
    for k in KEYS {
        let data = storage_bytes(k);
        let numel = ENTRIES.iter().find(|e| e.storage == k).unwrap().numel as u64;
        out.extend(numel.to_le_bytes());
        out.extend(data);
    }
    out
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

/// Every entry of ENTRIES read back with the values the storages define.
fn check_state_dict(tensors: &[(String, Tensor)]) {
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<&str> = ENTRIES.iter().map(|e| e.name).collect();
    assert_eq!(
        names, expected,
        "tensors in file order, non-tensors skipped"
    );
    let w = get(tensors, "w");
    assert!(w.is_contiguous());
    assert_eq!(
        w.to_vec2::<f32>().unwrap(),
        vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
    );
    assert_eq!(get(tensors, "b").to_vec1::<f32>().unwrap(), vec![4., 5.]);
    let h = get(tensors, "h");
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(
        h.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        vec![1.5, -2.]
    );
    let n = get(tensors, "bn.num_batches_tracked");
    assert_eq!((n.dtype(), n.rank()), (DType::I64, 0));
    assert_eq!(n.to_scalar::<i64>().unwrap(), 7);
    assert_eq!(get(tensors, "mask").to_vec1::<u8>().unwrap(), vec![1, 0, 1]);
    assert_eq!(
        get(tensors, "d").to_vec2::<f64>().unwrap(),
        vec![vec![1., 2.], vec![3., 4.]]
    );
    let i = get(tensors, "i");
    assert_eq!(i.dtype(), DType::I32);
    assert_eq!(
        i.to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap(),
        vec![-3, 9]
    );
}

#[test]
fn zip_checkpoint_loads_every_dtype_and_strided_view() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pth");
    write_zip(&path, false);
    check_state_dict(&load_pth(&path).unwrap());
}

#[test]
fn zip_checkpoint_wrapping_its_state_dict_loads_the_inner_dict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.pt");
    write_zip(&path, true);
    check_state_dict(&load_pth(&path).unwrap());
}

#[test]
fn legacy_checkpoint_loads_every_dtype_and_strided_view() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.pth");
    std::fs::write(&path, legacy_bytes()).unwrap();
    check_state_dict(&load_pth(&path).unwrap());
}

#[test]
fn conversion_writes_the_same_tensors_to_safetensors_and_reports_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("old.pth");
    let output = dir.path().join("out.safetensors");
    std::fs::write(&input, legacy_bytes()).unwrap();
    let report = convert_to_safetensors(&input, &output).unwrap();
    assert_eq!(report.format, PthFormat::Legacy);
    assert_eq!(report.tensors, ENTRIES.len());
    assert_eq!(report.elements, 6 + 2 + 2 + 1 + 3 + 4 + 2);
    assert_eq!(report.skipped, vec!["note".to_string()]);
    assert_eq!(
        report.bytes_written,
        std::fs::metadata(&output).unwrap().len()
    );

    let loaded = candle_core::safetensors::load(&output, &candle_core::Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> = loaded.into_iter().collect();
    tensors.sort_by_key(|(n, _)| ENTRIES.iter().position(|e| e.name == n).unwrap());
    check_state_dict(&tensors);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no temporary file left behind: {leftovers:?}"
    );
}

#[test]
fn a_zip_checkpoint_converts_too() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.pth");
    let output = dir.path().join("model.safetensors");
    write_zip(&input, false);
    let report = convert_to_safetensors(&input, &output).unwrap();
    assert_eq!(
        (report.format, report.tensors),
        (PthFormat::Zip, ENTRIES.len())
    );
}

#[test]
fn a_truncated_legacy_checkpoint_is_a_bad_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.pth");
    let bytes = legacy_bytes();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    match load_pth(&path) {
        Err(Error::BadFile { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("expected BadFile, got {other:?}"),
    }
}

#[test]
fn a_file_that_is_no_checkpoint_is_a_bad_file_and_a_missing_one_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "hello").unwrap();
    assert!(matches!(load_pth(&path), Err(Error::BadFile { .. })));
    let missing = dir.path().join("missing.pth");
    assert!(matches!(load_pth(&missing), Err(Error::Io { .. })));
    let out = dir.path().join("x.safetensors");
    assert!(matches!(
        convert_to_safetensors(&missing, &out),
        Err(Error::Io { .. })
    ));
    assert!(!out.exists());
}

//! Bad files and typos never lose a record or hide a NaN (issue 16, the file side): an output that is an
//! input is refused, NaN and infinite weights are refused where they are read, exports carry a checksum,
//! pickles that name code are refused as torch.load(weights_only=True) refuses them, and what graft prints
//! about files is written for people. Every test runs the real binary on small files made here.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{graft, graft_err, graft_ok, make_folder, resnet18_weights};
use graft::formats::checkpoint::Checkpoint;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A finished two-class fine-tuning run (one frozen epoch on 32x32 images from the golden ResNet-18
/// weights), its data folder and its export, made once for every test of this file. Tests copy what they
/// change.
struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    run: PathBuf,
    export: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        make_folder(&data, &["a", "b"], 4);
        let run = dir.path().join("run");
        let w = resnet18_weights();
        graft_ok(&[
            "finetune",
            "--base",
            "resnet18",
            "--weights",
            w.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--freeze-epochs",
            "1",
            "--epochs",
            "0",
            "--quiet",
            "--run-dir",
            run.to_str().unwrap(),
        ]);
        let export = dir.path().join("model.safetensors");
        graft_ok(&[
            "export",
            run.to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ]);
        Fixture {
            _dir: dir,
            data,
            run,
            export,
        }
    })
}

/// A copy of the fixture's run folder under `dir`.
fn copy_run(dir: &Path) -> PathBuf {
    let to = dir.join("run");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&fixture().run).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
    to
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The golden ResNet-18 weights with `edit` applied, written to `dir/name`.
fn edited_weights(dir: &Path, name: &str, edit: impl Fn(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut t = candle_core::safetensors::load(resnet18_weights(), &Device::Cpu).unwrap();
    edit(&mut t);
    let path = dir.join(name);
    candle_core::safetensors::save(&t, &path).unwrap();
    path
}

fn filled(like: &Tensor, value: f32) -> Tensor {
    Tensor::full(value, like.shape(), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------------------
// 6. An output that is an input is refused.

#[test]
fn export_refuses_to_write_over_the_runs_own_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = copy_run(tmp.path());
    let best = run.join("best.safetensors");
    let before = std::fs::read(&best).unwrap();
    let err = graft_err(&["export", s(&run), "--out", s(&best)], &[]);
    assert!(
        err.matches("best.safetensors").count() >= 2 && err.contains("same file"),
        "the error names the output and the input: {err}"
    );
    assert_eq!(
        std::fs::read(&best).unwrap(),
        before,
        "best.safetensors is untouched"
    );

    // Another spelling of the same path, and a hard link elsewhere to the last checkpoint.
    let dotted = run.join(".").join("last.safetensors");
    graft_err(&["export", s(&run), "--out", s(&dotted)], &[]);
    let link = tmp.path().join("linked.safetensors");
    std::fs::hard_link(run.join("last.safetensors"), &link).unwrap();
    let last_before = std::fs::read(run.join("last.safetensors")).unwrap();
    let err = graft_err(&["export", s(&run), "--out", s(&link)], &[]);
    assert!(
        err.contains("linked.safetensors") && err.contains("last.safetensors"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("last.safetensors")).unwrap(),
        last_before
    );
    // The run's metrics are a record too.
    let metrics = run.join("metrics.jsonl");
    let err = graft_err(&["export", s(&run), "--out", s(&metrics)], &[]);
    assert!(err.contains("metrics.jsonl"), "{err}");
}

#[test]
fn convert_refuses_to_replace_its_input() {
    let tmp = tempfile::tempdir().unwrap();
    let pth = tmp.path().join("x.pth");
    write_zip_pth(&pth, &tensor_entry_pickle(None));
    let before = std::fs::read(&pth).unwrap();
    let err = graft_err(&["convert", s(&pth), s(&pth)], &[]);
    assert!(
        err.matches("x.pth").count() >= 2 && err.contains("same file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&pth).unwrap(), before);

    let hard = tmp.path().join("hard.safetensors");
    std::fs::hard_link(&pth, &hard).unwrap();
    let err = graft_err(&["convert", s(&pth), s(&hard)], &[]);
    assert!(
        err.contains("hard.safetensors") && err.contains("x.pth"),
        "{err}"
    );
    #[cfg(unix)]
    {
        let soft = tmp.path().join("soft.safetensors");
        std::os::unix::fs::symlink(&pth, &soft).unwrap();
        graft_err(&["convert", s(&pth), s(&soft)], &[]);
    }
    assert_eq!(std::fs::read(&pth).unwrap(), before);
    // A different output still converts, and says which format it read in words.
    let out = graft_ok(&["convert", s(&pth), s(&tmp.path().join("y.safetensors"))]);
    assert!(out.contains("zip-format") && !out.contains("Zip"), "{out}");
}

// ---------------------------------------------------------------------------------------------------------
// 8. NaN and infinities are never hidden.

#[test]
fn an_all_nan_convolution_weight_is_refused_naming_the_tensor_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = edited_weights(tmp.path(), "nan.safetensors", |t| {
        let w = filled(&t["layer1.0.conv1.weight"], f32::NAN);
        t.insert("layer1.0.conv1.weight".into(), w);
    });
    make_folder(&tmp.path().join("d"), &["a"], 1);
    let img = tmp.path().join("d/a/000.png");
    let err = graft_err(
        &[
            "predict",
            "--base",
            "resnet18",
            "--weights",
            s(&bad),
            s(&img),
        ],
        &[],
    );
    assert!(
        err.contains("layer1.0.conv1.weight")
            && err.contains("nan.safetensors")
            && err.contains("NaN"),
        "{err}"
    );
    // The same for a PyTorch file, read by convert and by --weights.
    let pth = tmp.path().join("inf.pth");
    write_zip_pth_with(&pth, &tensor_entry_pickle(None), &[1.0, f32::INFINITY]);
    let err = graft_err(
        &["convert", s(&pth), s(&tmp.path().join("o.safetensors"))],
        &[],
    );
    assert!(err.contains("`w`") && err.contains("inf.pth"), "{err}");
    assert!(!tmp.path().join("o.safetensors").exists());
}

#[test]
fn export_refuses_infinite_weights_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = copy_run(tmp.path());
    let best = run.join("best.safetensors");
    let mut ck = Checkpoint::load(&best, &Device::Cpu).unwrap();
    let key = "model.layer2.0.conv1.weight";
    let inf = filled(&ck.tensors()[key], f32::INFINITY);
    ck.insert(key, inf);
    ck.save(&best).unwrap();
    let out = tmp.path().join("m.safetensors");
    let err = graft_err(&["export", s(&run), "--out", s(&out)], &[]);
    assert!(
        err.contains(key) && err.contains("best.safetensors"),
        "{err}"
    );
    assert!(!out.exists(), "nothing was written");
}

#[test]
fn an_export_holding_nan_is_refused_when_it_is_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    // An export as an older graft wrote it (no checksum), with one NaN in the head.
    let (mut tensors, mut meta) = read_st(&fixture().export);
    meta.remove("graft.sha256");
    let w = tensors["head.fc.weight"].flatten_all().unwrap();
    let mut v = w.to_vec1::<f32>().unwrap();
    v[0] = f32::NAN;
    let shape = tensors["head.fc.weight"].shape().clone();
    tensors.insert(
        "head.fc.weight".into(),
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
    );
    let bad = tmp.path().join("nan-model.safetensors");
    write_st(&bad, &tensors, meta);
    let img = fixture().data.join("a/000.png");
    let err = graft_err(&["predict", "--model", s(&bad), s(&img)], &[]);
    assert!(
        err.contains("head.fc.weight") && err.contains("nan-model.safetensors"),
        "{err}"
    );
    let err = graft_err(
        &["eval", "--model", s(&bad), "--data", s(&fixture().data)],
        &[],
    );
    assert!(err.contains("head.fc.weight"), "{err}");
}

#[test]
fn outputs_that_overflow_are_an_error_not_nan_percent() {
    let tmp = tempfile::tempdir().unwrap();
    // Finite weights so large that the logits overflow: the load accepts them, the output check does not.
    let huge = edited_weights(tmp.path(), "huge.safetensors", |t| {
        let w = filled(&t["fc.weight"], 3e38);
        t.insert("fc.weight".into(), w);
    });
    let img = fixture().data.join("a/000.png");
    let out = graft(
        &[
            "predict",
            "--base",
            "resnet18",
            "--weights",
            s(&huge),
            s(&img),
        ],
        &[],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "exit 0 with:\n{stdout}");
    assert!(!stdout.contains("NaN"), "{stdout}");
    assert!(
        stderr.contains("NaN or infinite")
            && stderr.contains("000.png")
            && stderr.contains("huge.safetensors"),
        "{stderr}"
    );

    // The same through an export and eval.
    let run = copy_run(tmp.path());
    let best = run.join("best.safetensors");
    let mut ck = Checkpoint::load(&best, &Device::Cpu).unwrap();
    let key = "model.head.fc.weight";
    let w = filled(&ck.tensors()[key], 3e38);
    ck.insert(key, w);
    ck.save(&best).unwrap();
    let model = tmp.path().join("huge-model.safetensors");
    graft_ok(&["export", s(&run), "--out", s(&model)]);
    let err = graft_err(
        &["eval", "--model", s(&model), "--data", s(&fixture().data)],
        &[],
    );
    assert!(
        err.contains("NaN or infinite")
            && err.contains("huge-model.safetensors")
            && err.contains(".png"),
        "{err}"
    );
    let err = graft_err(&["predict", "--model", s(&model), s(&img)], &[]);
    assert!(err.contains("NaN or infinite"), "{err}");
}

#[test]
fn exports_carry_a_checksum_that_loading_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, meta) = read_st(&fixture().export);
    assert_eq!(
        meta.get("graft.sha256").map(String::len),
        Some(64),
        "{meta:?}"
    );
    // One flipped mantissa bit: the weights stay finite and plausible, the checksum catches it.
    let mut bytes = std::fs::read(&fixture().export).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[data_start + 1] ^= 0x01;
    let bad = tmp.path().join("flipped.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let img = fixture().data.join("a/000.png");
    let err = graft_err(&["predict", "--model", s(&bad), s(&img)], &[]);
    assert!(
        err.contains("flipped.safetensors") && err.contains("checksum"),
        "{err}"
    );
    // An export from before checksums (none in its metadata) still loads.
    let (tensors, mut meta) = read_st(&fixture().export);
    meta.remove("graft.sha256");
    let old = tmp.path().join("old.safetensors");
    write_st(&old, &tensors, meta);
    let out = graft_ok(&["predict", "--model", s(&old), s(&img)]);
    assert!(out.contains("000.png") && !out.contains("NaN"), "{out}");
    // The export left no temporary file beside itself.
    let dir = fixture().export.parent().unwrap();
    let tmps: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmps.is_empty(), "{tmps:?}");
}

// ---------------------------------------------------------------------------------------------------------
// 10. Pickles that name code are refused.

#[test]
fn pickles_naming_code_are_refused_in_both_formats() {
    let tmp = tempfile::tempdir().unwrap();
    for (module, name) in [
        ("posix", "system"),
        ("os", "system"),
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("mymodels", "Net"),
    ] {
        let pickle = tensor_entry_pickle(Some((module, name)));
        for legacy in [false, true] {
            let pth = tmp.path().join(format!("{module}-{name}-{legacy}.pth"));
            if legacy {
                std::fs::write(&pth, legacy_pth(&pickle)).unwrap();
            } else {
                write_zip_pth(&pth, &pickle);
            }
            let out = tmp.path().join("out.safetensors");
            let err = graft_err(&["convert", s(&pth), s(&out)], &[]);
            let global = format!("{module}.{name}");
            assert!(
                err.contains(&global)
                    && err.contains(pth.file_name().unwrap().to_str().unwrap())
                    && err.contains("weights_only"),
                "{global} ({}): {err}",
                if legacy { "legacy" } else { "zip" }
            );
            assert!(!out.exists(), "nothing converted from {global}");
            let err = graft_err(
                &["inspect", "--base", "resnet18", "--weights", s(&pth)],
                &[],
            );
            assert!(err.contains(&global), "{err}");
        }
    }
    // The same file without the code global converts (the fixture pickles are otherwise sound).
    let good = tmp.path().join("good.pth");
    std::fs::write(&good, legacy_pth(&tensor_entry_pickle(None))).unwrap();
    graft_ok(&["convert", s(&good), s(&tmp.path().join("good.safetensors"))]);
}

// ---------------------------------------------------------------------------------------------------------
// 13. What graft says about files is written for people.

#[test]
fn inspect_says_where_the_weights_came_from_in_words() {
    let w = resnet18_weights();
    let out = graft_ok(&["inspect", "--base", "resnet18", "--weights", s(&w)]);
    assert!(
        out.contains(&format!("weights from: a local file {}", w.display())),
        "{out}"
    );
    assert!(!out.contains("Local"), "{out}");
    // From graft's cache, offline and with an empty hub cache.
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("graft");
    std::fs::create_dir_all(cache.join("weights")).unwrap();
    std::fs::copy(&w, cache.join("weights/resnet18.safetensors")).unwrap();
    let hf = tmp.path().join("hf");
    let out = graft(
        &["inspect", "--base", "resnet18"],
        &[
            ("GRAFT_CACHE", s(&cache)),
            ("HF_HOME", s(&hf)),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("weights from: graft's cache (") && stdout.contains("resnet18.safetensors"),
        "{stdout}"
    );
    assert!(!stdout.contains("GraftCache"), "{stdout}");
}

#[test]
fn converted_dtypes_are_mentioned_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut n_float = 0;
    let half = edited_weights(tmp.path(), "half.safetensors", |t| {
        for v in t.values_mut() {
            if v.dtype() == DType::F32 {
                *v = v.to_dtype(DType::F16).unwrap();
            }
        }
    });
    for v in candle_core::safetensors::load(&half, &Device::Cpu)
        .unwrap()
        .values()
    {
        n_float += usize::from(v.dtype() == DType::F16);
    }
    let out = graft_ok(&["inspect", "--base", "resnet18", "--weights", s(&half)]);
    assert!(
        out.contains(&format!("converted {n_float} f16 tensors to f32")),
        "{out}"
    );
    assert_eq!(
        out.matches("f16").count(),
        1,
        "one mention, not one per tensor: {out}"
    );
}

#[test]
fn predict_given_a_training_checkpoint_says_how_to_export_it() {
    let best = fixture().run.join("best.safetensors");
    let img = fixture().data.join("a/000.png");
    let err = graft_err(&["predict", "--model", s(&best), s(&img)], &[]);
    assert!(
        err.contains("training checkpoint")
            && err.contains(&format!("graft export {}", fixture().run.display()))
            && err.contains("--out"),
        "{err}"
    );
}

#[test]
fn eval_on_a_folder_holding_only_test_reads_the_test_split() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("only-test");
    make_folder(&data.join("test"), &["a", "b"], 2);
    let model = &fixture().export;
    for split in [Some("test"), None] {
        let mut args = vec!["eval", "--model", s(model), "--data", s(&data), "--json"];
        if let Some(split) = split {
            args.extend(["--split", split]);
        }
        let out: serde_json::Value = serde_json::from_str(&graft_ok(&args)).unwrap();
        assert_eq!(out["split"], "test", "{out}");
        assert_eq!(out["images"], 4, "{out}");
    }
    let err = graft_err(
        &[
            "eval",
            "--model",
            s(model),
            "--data",
            s(&data),
            "--split",
            "val",
        ],
        &[],
    );
    assert!(err.contains("val") && err.contains("only-test"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------
// Small PyTorch files, written as torch.save writes them (see tests/pth_formats.rs for the full story).

/// A protocol-2 pickle of `{'w': FloatTensor[2] (storage '0'), 'x': module.name('echo pwned')}` (the second
/// entry only with `code`), the shape of an innocent-looking state dict carrying a payload.
fn tensor_entry_pickle(code: Option<(&str, &str)>) -> Vec<u8> {
    let mut p: Vec<u8> = vec![0x80, 2];
    let str_op = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let global = |p: &mut Vec<u8>, m: &str, n: &str| p.extend(format!("c{m}\n{n}\n").as_bytes());
    global(&mut p, "collections", "OrderedDict");
    p.extend(b")R(");
    str_op(&mut p, "w");
    global(&mut p, "torch._utils", "_rebuild_tensor_v2");
    p.extend(b"((");
    str_op(&mut p, "storage");
    global(&mut p, "torch", "FloatStorage");
    str_op(&mut p, "0");
    str_op(&mut p, "cpu");
    p.extend([b'K', 2, b't', b'Q']); // numel 2, end of the persistent id
    p.extend([b'K', 0]); // offset
    p.extend([b'(', b'K', 2, b't']); // size
    p.extend([b'(', b'K', 1, b't']); // stride
    p.push(0x89); // requires_grad False
    global(&mut p, "collections", "OrderedDict");
    p.extend(b")Rt");
    p.push(b'R');
    if let Some((m, n)) = code {
        str_op(&mut p, "x");
        global(&mut p, m, n);
        p.push(b'(');
        str_op(&mut p, "echo pwned");
        p.extend(b"tR");
    }
    p.extend(b"u.");
    p
}

/// The bytes of storage '0': two f32.
fn storage0() -> Vec<u8> {
    storage_of(&[1.0, 2.0])
}

fn storage_of(values: &[f32; 2]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_zip_pth(path: &Path, pickle: &[u8]) {
    write_zip_pth_with(path, pickle, &[1.0, 2.0]);
}

/// A zip-format file holding `pickle` and storage '0' with `values`.
fn write_zip_pth_with(path: &Path, pickle: &[u8], values: &[f32; 2]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in [
        ("data.pkl", pickle.to_vec()),
        ("byteorder", b"little".to_vec()),
        ("data/0", storage_of(values)),
        ("version", b"3\n".to_vec()),
    ] {
        zip.start_file(format!("archive/{name}"), opts).unwrap();
        zip.write_all(&data).unwrap();
    }
    zip.finish().unwrap();
}

/// A legacy-format file around `pickle` (whose persistent ids must then have 6 fields: the zip pickle's
/// 5-field ids are rewritten here by inserting `None` before the closing `t` of each id).
fn legacy_pth(pickle: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut i = 0;
    while i < pickle.len() {
        if pickle[i..].starts_with(&[b'K', 2, b't', b'Q']) {
            body.extend([b'K', 2, b'N', b't', b'Q']);
            i += 4;
        } else {
            body.push(pickle[i]);
            i += 1;
        }
    }
    let mut out = Vec::new();
    out.extend([
        0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ]);
    out.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']); // protocol version 1001
    out.extend([0x80, 2, b'}', b'(']);
    out.extend([b'X', 13, 0, 0, 0]);
    out.extend(b"little_endian");
    out.extend([0x88, b'u', b'.']);
    out.extend(body);
    out.extend([0x80, 2, b']', b'(', b'X', 1, 0, 0, 0, b'0', b'e', b'.']);
    out.extend(2u64.to_le_bytes());
    out.extend(storage0());
    out
}

fn read_st(path: &Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    (tensors, meta)
}

fn write_st(path: &Path, tensors: &HashMap<String, Tensor>, meta: HashMap<String, String>) {
    let bytes = safetensors::tensor::serialize(tensors, Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

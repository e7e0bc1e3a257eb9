//! PyTorch checkpoints (`.pth`, `.pt`, `.bin`) read without Python, and their conversion to safetensors.
//!
//! Two on-disk formats exist and both are read:
//! * **zip** (torch >= 1.6 default): a zip archive `<name>/data.pkl` (the pickled object) plus one raw,
//!   little-endian entry `<name>/data/<key>` per storage.
//! * **legacy** (`_use_new_zipfile_serialization=False`, and everything older): five back-to-back parts,
//!   a pickled magic number, a pickled protocol version, a pickled sys-info dict, the pickled object, a
//!   pickled list of storage keys; then, per key in that order, a little-endian `u64` element count and
//!   the raw storage bytes.
//!
//! The pickles are decoded by a small unpickler that knows the binary opcodes of protocols 2 to 5 and the
//! handful of callables torch uses (`_rebuild_tensor_v2`, `OrderedDict`, ...). It never runs code, but a file
//! whose pickle names any global outside the allow-list of `torch.load(weights_only=True)` ([`allowed_global`];
//! `posix.system`, `builtins.eval`, `subprocess.Popen`, a pickled `nn.Module` class, ...) is refused with
//! [`Error::UnsafePickle`] naming the file and the global, as torch refuses it: such a file would run code
//! when Python loads it, and a state dict never needs one. An allowed callable graft does not interpret
//! (`torch.Size`, ...) becomes an inert object, which is only an error if a tensor is expected there. Tensors
//! may be non-contiguous views (the EfficientNet-Lite0 weights are), so each one is gathered through its
//! offset and strides into a fresh contiguous tensor.
//!
//! candle ships a pickle reader too, but it rejects the non-contiguous tensors of legacy files, which is
//! why graft carries its own.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// The two on-disk layouts of `torch.save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PthFormat {
    /// Zip archive, written by torch >= 1.6 by default.
    Zip,
    /// Pickles followed by raw storages, written by older torch or `_use_new_zipfile_serialization=False`.
    Legacy,
}

impl std::fmt::Display for PthFormat {
    /// How the format is named to people: `zip` or `legacy`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PthFormat::Zip => "zip",
            PthFormat::Legacy => "legacy",
        })
    }
}

/// What [`convert_to_safetensors`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// Layout of the input checkpoint.
    pub format: PthFormat,
    /// Number of tensors written.
    pub tensors: usize,
    /// Total number of elements over all tensors written.
    pub elements: usize,
    /// Entries of the state dict that are not tensors and were therefore left out.
    pub skipped: Vec<String>,
    /// Size of the safetensors file written, in bytes.
    pub bytes_written: u64,
}

/// Reads the state dict of a PyTorch checkpoint as named, contiguous CPU tensors in file order.
///
/// The pickled object must be a dict (or `OrderedDict`) that either is the state dict itself or holds it
/// under `state_dict`, `model` or `model_state_dict` (the common training-checkpoint wrappers). Entries
/// whose value is not a tensor are skipped. Storage types map to candle dtypes one to one, except
/// `bool` -> `u8` and `int8` -> `i16` (candle has neither). Every failure is a [`Error::BadFile`] naming
/// the file.
pub fn load_pth(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    Ok(read_checkpoint(path.as_ref())?.tensors)
}

/// Converts a PyTorch checkpoint into a safetensors file with the same tensor names.
///
/// The output is written atomically ([`crate::fsutil::write_atomic`]: a temporary file next to `output`,
/// synced, renamed into place), so an interrupted conversion never leaves a truncated file under the final
/// name. An `output` that is the input itself (the same path, a symlink or a hard link) is refused with
/// [`Error::OutputIsInput`] before anything is read, since the conversion would replace its own input.
pub fn convert_to_safetensors(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
) -> Result<ConvertReport> {
    let (input, output) = (input.as_ref(), output.as_ref());
    crate::fsutil::refuse_output_over_input(output, [input])?;
    let checkpoint = read_checkpoint(input)?;
    if checkpoint.tensors.is_empty() {
        return Err(Error::bad_file(input, "the state dict holds no tensors"));
    }
    let elements = checkpoint.tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let count = checkpoint.tensors.len();
    let map: HashMap<String, Tensor> = checkpoint.tensors.into_iter().collect();

    if output.file_name().is_none() {
        return Err(Error::config(
            "output path",
            format!("{} names no file", output.display()),
        ));
    }
    // Serialised in memory and written with std::fs, so the file gets the usual permissions (safetensors'
    // own writer goes through a 0600 temporary file).
    let bytes = safetensors::tensor::serialize(&map, None)
        .map_err(|e| Error::bad_file(output, format!("cannot serialise to safetensors: {e}")))?;
    crate::fsutil::write_atomic(output, &bytes)?;
    let bytes_written = bytes.len() as u64;
    Ok(ConvertReport {
        format: checkpoint.format,
        tensors: count,
        elements,
        skipped: checkpoint.skipped,
        bytes_written,
    })
}

/// A decoded checkpoint: tensors in file order plus the names of non-tensor entries.
struct Checkpoint {
    format: PthFormat,
    tensors: Vec<(String, Tensor)>,
    skipped: Vec<String>,
}

/// Reads a checkpoint in either format. Errors name `path`: [`Error::UnsafePickle`] for a global outside the
/// allow-list, [`Error::NonFiniteTensor`] for a tensor holding NaN or an infinity, [`Error::BadFile`] for
/// everything else.
fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let read = if bytes.starts_with(b"PK\x03\x04") {
        read_zip(&bytes)
    } else if bytes.first() == Some(&0x80) {
        read_legacy(&bytes)
    } else {
        Err("not a PyTorch checkpoint (neither a zip archive nor a pickle)".into())
    };
    let checkpoint = read.map_err(|e| match e {
        PickleError::Malformed(reason) => Error::bad_file(path, reason),
        PickleError::Unsafe { global } => Error::UnsafePickle {
            path: path.to_path_buf(),
            hint: unsafe_global_hint(&global),
            global,
        },
    })?;
    for (name, t) in &checkpoint.tensors {
        crate::formats::finite::ensure_finite(name, t, path)?;
    }
    Ok(checkpoint)
}

/// Why a pickle could not be read.
#[derive(Debug)]
enum PickleError {
    /// Truncated, corrupt or not what torch writes.
    Malformed(String),
    /// It names `global` (`module.name`), which [`allowed_global`] refuses.
    Unsafe { global: String },
}

impl PickleError {
    /// Prefixes a malformed file's reason with where it was found; a refusal stays as it is.
    fn context(self, at: &str) -> Self {
        match self {
            PickleError::Malformed(r) => PickleError::Malformed(format!("{at}: {r}")),
            unsafe_global => unsafe_global,
        }
    }
}

impl From<String> for PickleError {
    fn from(reason: String) -> Self {
        PickleError::Malformed(reason)
    }
}

impl From<&str> for PickleError {
    fn from(reason: &str) -> Self {
        PickleError::Malformed(reason.to_string())
    }
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickleError::Malformed(r) => f.write_str(r),
            PickleError::Unsafe { global } => write!(f, "global `{global}` is not allowed"),
        }
    }
}

/// Whether a pickle may name `module.name`: the globals `torch.load(weights_only=True)` allows by default
/// (`_get_allowed_globals` in torch/_weights_only_unpickler.py, torch 2.4 to 2.6): the tensor and parameter
/// rebuild functions, storage and tensor classes, dtypes, layouts, quantisation schemes, `torch.Size`,
/// `torch.device`, `collections.OrderedDict`/`Counter`, and the builtins `set`, `bytearray`, `complex` and
/// `_codecs.encode` (Python 2's `__builtin__` spelling included). Nothing else: no module a pickle could
/// run code through, and no user class (a pickled model rather than its state dict).
fn allowed_global(module: &str, name: &str) -> bool {
    const REBUILD: &[&str] = &[
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_nested_tensor",
        "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
    ];
    const ELEMENTS: &[&str] = &[
        "Double",
        "Float",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexDouble",
        "ComplexFloat",
        "QUInt8",
        "QInt8",
        "QInt32",
        "QUInt4x2",
        "QUInt2x4",
    ];
    const DTYPES: &[&str] = &[
        "float16",
        "float32",
        "float64",
        "bfloat16",
        "complex32",
        "complex64",
        "complex128",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "qint8",
        "quint8",
        "qint32",
        "quint4x2",
        "quint2x4",
        "float8_e5m2",
        "float8_e4m3fn",
        "float8_e5m2fnuz",
        "float8_e4m3fnuz",
        "bits8",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
    ];
    const TORCH_OTHER: &[&str] = &[
        "Size",
        "Tensor",
        "device",
        "UntypedStorage",
        "TypedStorage",
        "strided",
        "sparse_coo",
        "sparse_csr",
        "sparse_csc",
        "sparse_bsr",
        "sparse_bsc",
        "_mkldnn",
        "per_tensor_affine",
        "per_channel_affine",
        "per_tensor_symmetric",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    ];
    let class_of = |suffix: &str| {
        name.strip_suffix(suffix)
            .is_some_and(|element| ELEMENTS.contains(&element))
    };
    match module {
        "collections" => matches!(name, "OrderedDict" | "Counter"),
        "builtins" | "__builtin__" => matches!(name, "set" | "bytearray" | "complex"),
        "_codecs" => name == "encode",
        "torch._utils" => REBUILD.contains(&name),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch.nn.parameter" => name == "Parameter",
        "torch.serialization" => name == "_get_layout",
        "torch.storage" => matches!(name, "UntypedStorage" | "TypedStorage"),
        "torch" => {
            TORCH_OTHER.contains(&name)
                || DTYPES.contains(&name)
                || class_of("Storage")
                || class_of("Tensor")
        }
        "torch.cuda" => class_of("Storage") || class_of("Tensor"),
        _ => false,
    }
}

/// Advice for a refused global that looks like a pickled model class rather than a way to run code.
fn unsafe_global_hint(global: &str) -> String {
    const CODE_MODULES: &[&str] = &[
        "os",
        "posix",
        "nt",
        "subprocess",
        "builtins",
        "__builtin__",
        "sys",
        "shutil",
        "socket",
        "pty",
        "runpy",
        "importlib",
        "operator",
        "functools",
        "pickle",
        "marshal",
        "ctypes",
        "code",
        "types",
        "webbrowser",
        "commands",
        "platform",
    ];
    let (module, name) = global.rsplit_once('.').unwrap_or(("", global));
    let root = module.split('.').next().unwrap_or(module);
    if CODE_MODULES.contains(&root) || !name.starts_with(|c: char| c.is_ascii_uppercase()) {
        String::new()
    } else {
        format!(
            "; if `{global}` is your model class, save `model.state_dict()` instead of the model"
        )
    }
}

/// The magic number heading a legacy checkpoint, `0x1950a86a20f9469cfc6c`, as little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn read_legacy(bytes: &[u8]) -> std::result::Result<Checkpoint, PickleError> {
    let mut pos = 0;
    let mut next_pickle = |what: &str| {
        let (value, end) = Unpickler::new(bytes, pos)
            .run()
            .map_err(|e| e.context(&format!("{what} pickle")))?;
        pos = end;
        Ok::<_, PickleError>(value)
    };
    match next_pickle("magic number")? {
        Value::BigInt(b) if b == LEGACY_MAGIC => {}
        _ => return Err("a pickle, but not a torch.save checkpoint (wrong magic number)".into()),
    }
    match next_pickle("protocol version")? {
        Value::Int(1001) => {}
        other => return Err(format!("unsupported legacy protocol version {other:?}").into()),
    }
    if let Value::Dict(info) = next_pickle("sys info")? {
        let little = info.borrow().iter().any(
            |(k, v)| matches!((k, v), (Value::Str(k), Value::Bool(true)) if k == "little_endian"),
        );
        if !little {
            return Err(
                "written on a big-endian machine; only little-endian files are read".into(),
            );
        }
    }
    let root = next_pickle("main")?;
    let keys = match next_pickle("storage keys")? {
        Value::List(keys) => keys.borrow().clone(),
        other => return Err(format!("storage key list expected, found {other:?}").into()),
    };

    // The storages follow in the order of the key list: u64 element count, then raw bytes.
    let layouts = storage_layouts(&root);
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(format!("storage key is not a string: {key:?}").into());
        };
        let numel = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
            .ok_or_else(|| format!("truncated before storage {key}"))?;
        pos += 8;
        let elem = layouts
            .get(&key)
            .map(|t| t.size())
            .ok_or_else(|| format!("storage {key} is listed but no tensor uses it"))?;
        let len = numel
            .checked_mul(elem)
            .ok_or_else(|| format!("storage {key} too large"))?;
        let data = bytes
            .get(pos..pos + len)
            .ok_or_else(|| format!("truncated in storage {key} ({numel} elements)"))?;
        pos += len;
        storages.insert(key, data);
    }
    Ok(materialise(PthFormat::Legacy, &root, |key| {
        storages
            .get(key)
            .map(|&d| d.into())
            .ok_or_else(|| format!("storage {key} missing from the file"))
    })?)
}

fn read_zip(bytes: &[u8]) -> std::result::Result<Checkpoint, PickleError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("bad zip archive: {e}"))?;
    let pkl_name = archive
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_owned)
        .ok_or("zip archive without data.pkl: not a torch.save checkpoint")?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let mut read_entry = |name: &str| -> std::result::Result<Vec<u8>, String> {
        let mut entry = archive
            .by_name(name)
            .map_err(|e| format!("entry {name}: {e}"))?;
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut out)
            .map_err(|e| format!("entry {name}: {e}"))?;
        Ok(out)
    };
    if let Ok(order) = read_entry(&format!("{prefix}byteorder")) {
        if order != b"little" {
            return Err(format!(
                "byte order {:?}; only little-endian files are read",
                String::from_utf8_lossy(&order)
            )
            .into());
        }
    }
    let pickle = read_entry(&pkl_name)?;
    let (root, _) = Unpickler::new(&pickle, 0)
        .run()
        .map_err(|e| e.context(&pkl_name))?;
    Ok(materialise(PthFormat::Zip, &root, |key| {
        read_entry(&format!("{prefix}data/{key}")).map(Into::into)
    })?)
}

/// The storage type of every storage referenced by a tensor under `root`, keyed by storage key.
fn storage_layouts(root: &Value) -> HashMap<String, StorageType> {
    fn walk(v: &Value, out: &mut HashMap<String, StorageType>) {
        match v {
            Value::Tensor(t) => {
                out.insert(t.storage.key.clone(), t.storage.ty);
            }
            Value::Storage(s) => {
                out.insert(s.key.clone(), s.ty);
            }
            Value::Tuple(items) => items.iter().for_each(|i| walk(i, out)),
            Value::List(items) => items.borrow().iter().for_each(|i| walk(i, out)),
            Value::Dict(items) => items.borrow().iter().for_each(|(_, i)| walk(i, out)),
            Value::Object { args, .. } => args.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = HashMap::new();
    walk(root, &mut out);
    out
}

/// Finds the state dict under `root` and turns its tensor entries into candle tensors, fetching each
/// storage's bytes once through `storage`.
fn materialise<'a>(
    format: PthFormat,
    root: &Value,
    mut storage: impl FnMut(&str) -> std::result::Result<std::borrow::Cow<'a, [u8]>, String>,
) -> std::result::Result<Checkpoint, String> {
    let entries = state_dict_entries(root)?;
    let mut cache: HashMap<String, std::borrow::Cow<'a, [u8]>> = HashMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for (name, value) in entries {
        let Value::Tensor(t) = value else {
            skipped.push(name);
            continue;
        };
        if !cache.contains_key(&t.storage.key) {
            let data = storage(&t.storage.key)?;
            cache.insert(t.storage.key.clone(), data);
        }
        let data = &cache[&t.storage.key];
        let tensor = t.build(data).map_err(|e| format!("tensor `{name}`: {e}"))?;
        tensors.push((name, tensor));
    }
    Ok(Checkpoint {
        format,
        tensors,
        skipped,
    })
}

/// The `(name, value)` entries of the state dict under `root`, in insertion order; a key set twice keeps
/// its first position and its last value, as a Python dict does.
fn state_dict_entries(root: &Value) -> std::result::Result<Vec<(String, Value)>, String> {
    let Value::Dict(items) = root else {
        return Err(format!(
            "the checkpoint holds {}, not a state dict (save `model.state_dict()`)",
            root.describe()
        ));
    };
    let items = items.borrow();
    for wrapper in ["state_dict", "model", "model_state_dict"] {
        let inner = items
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, Value::Str(k) if k == wrapper));
        match inner {
            Some((_, v @ Value::Dict(_))) => return state_dict_entries(v),
            Some((_, v)) if !items.iter().any(|(_, x)| matches!(x, Value::Tensor(_))) => {
                return Err(format!(
                    "`{wrapper}` holds {}, not a state dict (save `model.state_dict()`)",
                    v.describe()
                ));
            }
            _ => {}
        }
    }
    let mut out: Vec<(String, Value)> = Vec::with_capacity(items.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for (k, v) in items.iter() {
        let Value::Str(k) = k else {
            return Err(format!("state dict key is not a string: {k:?}"));
        };
        match index.get(k) {
            Some(&i) => out[i].1 = v.clone(),
            None => {
                index.insert(k.clone(), out.len());
                out.push((k.clone(), v.clone()));
            }
        }
    }
    Ok(out)
}

/// Element types of torch storages, named after their legacy classes (`torch.FloatStorage`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" | "UntypedStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// A storage named by a persistent id: its key in the file, element type, and (legacy views only) the
/// element offset of the view inside the root storage.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    key: String,
    ty: StorageType,
    base: usize,
}

/// A tensor as pickled: a strided view into a storage.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// Gathers the view out of the storage bytes into a contiguous candle tensor.
    fn build(&self, data: &[u8]) -> std::result::Result<Tensor, String> {
        let elem = self.storage.ty.size();
        let numel = data.len() / elem;
        let offset = self.storage.base + self.offset;
        let count: usize = self.size.iter().product();
        if count > 0 {
            let last = offset
                + self
                    .size
                    .iter()
                    .zip(&self.stride)
                    .map(|(&n, &s)| (n - 1) * s)
                    .sum::<usize>();
            if last >= numel {
                return Err(format!(
                    "view (offset {offset}, size {:?}, stride {:?}) reaches element {last} of a \
                     {numel}-element storage",
                    self.size, self.stride
                ));
            }
        }
        let bytes = gather(data, elem, offset, &self.size, &self.stride);
        let (dtype, bytes) = match self.storage.ty {
            StorageType::F64 => (DType::F64, bytes),
            StorageType::F32 => (DType::F32, bytes),
            StorageType::F16 => (DType::F16, bytes),
            StorageType::BF16 => (DType::BF16, bytes),
            StorageType::I64 => (DType::I64, bytes),
            StorageType::I32 => (DType::I32, bytes),
            StorageType::I16 => (DType::I16, bytes),
            StorageType::I8 => (
                DType::I16,
                bytes
                    .iter()
                    .flat_map(|&b| (b as i8 as i16).to_le_bytes())
                    .collect(),
            ),
            StorageType::U8 | StorageType::Bool => (DType::U8, bytes),
        };
        Tensor::from_raw_buffer(&bytes, dtype, &self.size, &Device::Cpu).map_err(|e| e.to_string())
    }
}

/// Copies the elements of a strided view, in row-major order, into a new buffer. Bounds are checked by
/// the caller.
fn gather(data: &[u8], elem: usize, offset: usize, size: &[usize], stride: &[usize]) -> Vec<u8> {
    let count: usize = size.iter().product();
    let mut out = Vec::with_capacity(count * elem);
    if count == 0 {
        return out;
    }
    // Contiguous views are one slice.
    let mut expected = 1;
    let contiguous = size.iter().zip(stride).rev().all(|(&n, &s)| {
        let ok = n == 1 || s == expected;
        expected *= n;
        ok
    });
    if contiguous {
        out.extend_from_slice(&data[offset * elem..(offset + count) * elem]);
        return out;
    }
    // Odometer over all but the last dimension; the last dimension is copied as a run when dense.
    let rank = size.len();
    let (inner, inner_stride) = (size[rank - 1], stride[rank - 1]);
    let outer = &size[..rank - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let start = offset
            + index
                .iter()
                .zip(stride)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(&data[start * elem..(start + inner) * elem]);
        } else {
            for j in 0..inner {
                let at = (start + j * inner_stride) * elem;
                out.extend_from_slice(&data[at..at + elem]);
            }
        }
        // Advance the odometer; done when it wraps around entirely.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// A decoded pickle value. Lists and dicts are shared, because a pickle may fill a container after
/// memoising it and then fetch it again from the memo.
#[derive(Debug, Clone)]
#[allow(dead_code)] // some payloads are only ever read through `Debug`, in error messages
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for `i64`, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global {
        module: String,
        name: String,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
    /// The result of calling a callable the unpickler does not know; kept inert.
    Object {
        class: String,
        args: Vec<Value>,
    },
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::Object { class, .. } => format!("a pickled `{class}` object"),
            Value::Dict(_) => "a dict".into(),
            Value::List(_) => "a list".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::Tensor(_) => "a single tensor".into(),
            other => format!("{other:?}"),
        }
    }

    fn as_usize(&self, what: &str) -> std::result::Result<usize, String> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!(
                "{what}: non-negative integer expected, found {other:?}"
            )),
        }
    }

    fn as_usizes(&self, what: &str) -> std::result::Result<Vec<usize>, String> {
        match self {
            Value::Tuple(items) => items.iter().map(|i| i.as_usize(what)).collect(),
            Value::List(items) => items.borrow().iter().map(|i| i.as_usize(what)).collect(),
            other => Err(format!("{what}: tuple expected, found {other:?}")),
        }
    }
}

/// A stack machine over one pickle, started at `pos` in `data`.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// The first global [`allowed_global`] refused; reading stops there.
    refused: Option<String>,
}

type PickleResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Unpickler {
            data,
            pos,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            refused: None,
        }
    }

    fn take(&mut self, n: usize) -> PickleResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> PickleResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PickleResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> PickleResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> PickleResult<usize> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()) as usize)
    }
    fn line(&mut self) -> PickleResult<String> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("unterminated line at byte {}", self.pos))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> PickleResult<Value> {
        let at = self.pos;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Value::Str)
            .map_err(|_| format!("invalid UTF-8 string at byte {at}"))
    }

    fn pop(&mut self) -> PickleResult<Value> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }
    fn top(&mut self) -> PickleResult<&mut Value> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| format!("stack underflow at byte {pos}"))
    }
    /// Pops everything above the last MARK, and the mark.
    fn pop_mark(&mut self) -> PickleResult<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("no MARK before byte {}", self.pos))?;
        if m > self.stack.len() {
            return Err(format!("MARK above the stack at byte {}", self.pos));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&self, i: u32) -> PickleResult<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} unset at byte {}", self.pos))
    }
    fn memo_put(&mut self, i: u32) -> PickleResult<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))?;
        self.memo.insert(i, v);
        Ok(())
    }

    /// Runs to STOP; returns the value and the position after STOP. Stops at the first global outside the
    /// allow-list ([`PickleError::Unsafe`]).
    fn run(mut self) -> std::result::Result<(Value, usize), PickleError> {
        match self.run_opcodes() {
            Ok(done) => Ok(done),
            Err(reason) => Err(match self.refused.take() {
                Some(global) => PickleError::Unsafe { global },
                None => PickleError::Malformed(reason),
            }),
        }
    }

    /// Pushes `module.name` unless [`allowed_global`] refuses it, in which case it is recorded and reading
    /// stops.
    fn push_global(&mut self, module: String, name: String) -> PickleResult<()> {
        if !allowed_global(&module, &name) {
            let global = format!("{module}.{name}");
            let reason = format!("global `{global}` is not allowed");
            self.refused = Some(global);
            return Err(reason);
        }
        self.stack.push(Value::Global { module, name });
        Ok(())
    }

    fn run_opcodes(&mut self) -> PickleResult<(Value, usize)> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is newer than 5"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok((v, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    self.stack.push(long_value(b));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.utf8(n)?;
                    self.stack.push(v);
                }
                // Python 2 byte strings (BINSTRING, SHORT_BINSTRING), read as Latin-1 text.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let s = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.stack.push(Value::Str(s));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.u64()?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {at}"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b']' => self.stack.push(Value::List(Default::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                0x8f => self.stack.push(Value::List(Default::default())),
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v], at)?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items, at)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'}' => self.stack.push(Value::Dict(Default::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Default::default());
                    self.stack.push(d);
                    self.set_items(items, at)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v], at)?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items, at)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => self.push_global(module, name)?,
                        _ => return Err(format!("STACK_GLOBAL without strings at byte {at}")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = match args {
                        Value::Tuple(a) => a,
                        other => return Err(format!("REDUCE arguments {other:?} at byte {at}")),
                    };
                    let v = reduce(callable, args).map_err(|e| format!("byte {at}: {e}"))?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let args = match args {
                        Value::Tuple(a) => a,
                        other => vec![other],
                    };
                    let v = reduce(class, args).map_err(|e| format!("byte {at}: {e}"))?;
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let args = match args {
                        Value::Tuple(a) => a,
                        other => vec![other],
                    };
                    let v = reduce(class, args).map_err(|e| format!("byte {at}: {e}"))?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD sets an object's state (`__setstate__`/`__dict__`); for the containers and
                    // tensors read here the state carries only metadata (`_metadata`, hooks), so it is
                    // dropped.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid).map_err(|e| format!("byte {at}: {e}"))?;
                    self.stack.push(v);
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {at}"
                    ))
                }
            }
        }
    }

    fn append(&mut self, items: Vec<Value>, at: usize) -> PickleResult<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("APPENDS on {} at byte {at}", other.describe())),
        }
    }

    fn set_items(&mut self, items: Vec<Value>, at: usize) -> PickleResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err(format!("odd number of dict items at byte {at}"));
        }
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => Err(format!("SETITEMS on {} at byte {at}", other.describe())),
        }
    }
}

/// Decodes a pickled LONG: little-endian two's complement of any width.
fn long_value(b: &[u8]) -> Value {
    if b.len() <= 8 {
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut buf = [fill; 8];
        buf[..b.len()].copy_from_slice(b);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(b.to_vec())
    }
}

/// Calls one of the callables torch pickles refer to. The unpickler has already refused every global outside
/// [`allowed_global`]; an allowed one not interpreted here (`torch.Size`, ...) yields an inert object.
fn reduce(callable: Value, args: Vec<Value>) -> PickleResult<Value> {
    let Value::Global { module, name } = callable else {
        return Err(format!("call of a non-global {}", callable.describe()));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => {
            let mut items = Vec::new();
            if let Some(Value::List(pairs)) = args.first() {
                for pair in pairs.borrow().iter() {
                    match pair {
                        Value::Tuple(kv) if kv.len() == 2 => {
                            items.push((kv[0].clone(), kv[1].clone()))
                        }
                        other => return Err(format!("OrderedDict item {other:?}")),
                    }
                }
            }
            Ok(Value::Dict(Rc::new(RefCell::new(items))))
        }
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
            if args.len() < 4 {
                return Err(format!("{name} with {} arguments", args.len()));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(format!("{name} of {}", args[0].describe()));
            };
            let size = args[2].as_usizes("tensor size")?;
            let stride = args[3].as_usizes("tensor stride")?;
            if size.len() != stride.len() {
                return Err(format!(
                    "tensor size {size:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: args[1].as_usize("storage offset")?,
                size,
                stride,
            }))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => args
            .into_iter()
            .next()
            .ok_or_else(|| format!("{name} without arguments")),
        ("_codecs", "encode") => match args.first() {
            Some(Value::Str(s)) => Ok(Value::Bytes(s.chars().map(|c| c as u8).collect())),
            _ => Err("_codecs.encode of a non-string".into()),
        },
        ("builtins" | "__builtin__", "set") => {
            let items = match args.into_iter().next() {
                Some(Value::List(l)) => l.borrow().clone(),
                Some(Value::Tuple(t)) => t,
                _ => Vec::new(),
            };
            Ok(Value::List(Rc::new(RefCell::new(items))))
        }
        _ => Ok(Value::Object {
            class: format!("{module}.{name}"),
            args,
        }),
    }
}

/// Resolves a torch persistent id `('storage', StorageClass, key, location, numel[, view])` into a storage
/// reference. `view` (legacy files only) is `(view_key, offset, numel)` into the root storage `key`.
fn persistent_load(pid: Value) -> PickleResult<Value> {
    let Value::Tuple(items) = pid else {
        return Err(format!("persistent id {pid:?} is not a tuple"));
    };
    match items.first() {
        Some(Value::Str(tag)) if tag == "storage" && items.len() >= 5 => {}
        _ => return Err(format!("persistent id {items:?} is not a torch storage")),
    }
    let ty = match &items[1] {
        Value::Global { module, name } if module.starts_with("torch") => {
            StorageType::from_class(name)
                .ok_or_else(|| format!("unsupported storage type {module}.{name}"))?
        }
        other => return Err(format!("storage type {other:?}")),
    };
    let key = match &items[2] {
        Value::Str(k) => k.clone(),
        other => return Err(format!("storage key {other:?}")),
    };
    let base = match items.get(5) {
        Some(Value::Tuple(view)) if view.len() == 3 => view[1].as_usize("storage view offset")?,
        _ => 0,
    };
    Ok(Value::Storage(StorageRef { key, ty, base }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pickle writer for the tests: just enough opcodes to spell what torch writes.
    struct P(Vec<u8>);
    impl P {
        fn new() -> Self {
            P(vec![0x80, 2])
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
        fn int(self, i: u8) -> Self {
            self.op(&[b'K', i])
        }
        fn global(self, module: &str, name: &str) -> Self {
            self.op(format!("c{module}\n{name}\n").as_bytes())
        }
        fn tuple(self, ints: &[u8]) -> Self {
            let mut p = self.op(b"(");
            for &i in ints {
                p = p.int(i);
            }
            p.op(b"t")
        }
        /// `_rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), offset, size, stride, False, OrderedDict())`
        fn tensor(self, key: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b"((")
                .str("storage")
                .global("torch", "FloatStorage")
                .str(key)
                .str("cpu")
                .int(numel)
                .op(b"tQ")
                .int(offset)
                .tuple(size)
                .tuple(stride)
                .op(&[0x89])
                .global("collections", "OrderedDict")
                .op(b")Rt")
                .op(b"R")
        }
    }

    #[test]
    fn gather_reads_a_transposed_view_in_row_major_order() {
        // storage 0..6 viewed as the transpose of a 2x3 matrix: size [3, 2], stride [1, 3]
        let data: Vec<u8> = (0u8..6).collect();
        let out = gather(&data, 1, 0, &[3, 2], &[1, 3]);
        assert_eq!(out, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn gather_honours_offset_and_multibyte_elements() {
        let data: Vec<u8> = (0u16..8).flat_map(|v| v.to_le_bytes()).collect();
        let out = gather(&data, 2, 2, &[2, 2], &[1, 2]);
        let vals: Vec<u16> = out
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(vals, vec![2, 4, 3, 5]);
    }

    #[test]
    fn long_values_decode_as_twos_complement() {
        assert!(matches!(long_value(&[0xff]), Value::Int(-1)));
        assert!(matches!(long_value(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(long_value(&LEGACY_MAGIC), Value::BigInt(_)));
    }

    #[test]
    fn unpickler_builds_an_ordered_dict_of_strided_tensors() {
        let p = P::new()
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(&[b'q', 0])
            .op(b"(")
            .str("w")
            .tensor("0", 6, 0, &[3, 2], &[1, 3])
            .str("b")
            .tensor("1", 2, 1, &[1], &[1])
            .op(b"u.");
        let (v, end) = Unpickler::new(&p.0, 0).run().unwrap();
        assert_eq!(end, p.0.len());
        let entries = state_dict_entries(&v).unwrap();
        assert_eq!(entries.len(), 2);
        let Value::Tensor(w) = &entries[0].1 else {
            panic!("w is not a tensor")
        };
        assert_eq!(w.size, vec![3, 2]);
        assert_eq!(w.stride, vec![1, 3]);
        assert_eq!(w.storage.key, "0");
        let data: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let t = w.build(&data).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
        );
    }

    #[test]
    fn memoised_dict_filled_later_is_seen_filled_through_the_memo() {
        // d = {}; memo[0] = d; d['a'] = 1; result = (d, memo[0])
        let p = P::new()
            .op(b"}")
            .op(&[b'q', 0])
            .str("a")
            .int(1)
            .op(b"s")
            .op(&[b'h', 0])
            .op(&[0x86, b'.']);
        let (v, _) = Unpickler::new(&p.0, 0).run().unwrap();
        let Value::Tuple(items) = v else {
            panic!("not a tuple")
        };
        let Value::Dict(d) = &items[1] else {
            panic!("not a dict")
        };
        assert_eq!(d.borrow().len(), 1);
    }

    #[test]
    fn views_reaching_past_their_storage_are_rejected() {
        let t = TensorRef {
            storage: StorageRef {
                key: "0".into(),
                ty: StorageType::F32,
                base: 0,
            },
            offset: 2,
            size: vec![2, 2],
            stride: vec![2, 1],
        };
        let err = t.build(&[0u8; 16]).unwrap_err();
        assert!(err.contains("reaches element 5"), "{err}");
    }

    #[test]
    fn a_wrapped_state_dict_is_found_under_its_key() {
        let p = P::new()
            .op(b"}(")
            .str("epoch")
            .int(3)
            .str("state_dict")
            .op(b"}(")
            .str("w")
            .tensor("0", 1, 0, &[1], &[1])
            .op(b"uu.");
        let (v, _) = Unpickler::new(&p.0, 0).run().unwrap();
        let entries = state_dict_entries(&v).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, "w");
    }

    #[test]
    fn a_pickled_model_class_is_refused_by_name() {
        let p = P::new().global("mymodels", "Net").op(b")R.");
        match Unpickler::new(&p.0, 0).run() {
            Err(PickleError::Unsafe { global }) => assert_eq!(global, "mymodels.Net"),
            other => panic!("not refused: {other:?}"),
        }
        assert!(unsafe_global_hint("mymodels.Net").contains("state_dict"));
        assert_eq!(unsafe_global_hint("posix.system"), "");
    }

    #[test]
    fn an_allowed_global_that_is_not_a_tensor_is_reported_as_not_a_state_dict() {
        let p = P::new().global("torch", "Size").op(b"(K\x03tR.");
        let (v, _) = Unpickler::new(&p.0, 0).run().unwrap();
        let err = state_dict_entries(&v).unwrap_err();
        assert!(err.contains("torch.Size"), "{err}");
    }

    #[test]
    fn the_allow_list_is_torchs_weights_only_list() {
        for (m, n) in [
            ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"),
            ("torch", "FloatStorage"),
            ("torch", "BFloat16Storage"),
            ("torch.cuda", "HalfStorage"),
            ("torch", "float32"),
            ("collections", "OrderedDict"),
            ("_codecs", "encode"),
        ] {
            assert!(allowed_global(m, n), "{m}.{n} refused");
        }
        for (m, n) in [
            ("posix", "system"),
            ("os", "system"),
            ("builtins", "eval"),
            ("builtins", "exec"),
            ("builtins", "getattr"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch._utils", "_import_dotted_name"),
            ("torch.nn.modules.conv", "Conv2d"),
            ("numpy.core.multiarray", "_reconstruct"),
        ] {
            assert!(!allowed_global(m, n), "{m}.{n} allowed");
        }
    }

    #[test]
    fn unknown_opcodes_name_their_byte() {
        let err = Unpickler::new(&[0x80, 2, b'I'], 0)
            .run()
            .unwrap_err()
            .to_string();
        assert!(err.contains("0x49 at byte 2"), "{err}");
    }
}

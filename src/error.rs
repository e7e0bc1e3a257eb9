//! Typed library errors. Each variant names the file, tensor, flag or value at fault, so that the CLI
//! can print a message a person can act on. `anyhow` lives only in `src/cli` and `src/main.rs`.

use std::path::PathBuf;

/// Every error the graft library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A weights file does not hold a tensor the model needs.
    #[error("tensor `{name}` is missing from {file}")]
    MissingTensor { name: String, file: PathBuf },

    /// A tensor exists but has the wrong shape.
    #[error("tensor `{name}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A weights or checkpoint file is not in a format graft can read (truncated, corrupt, unknown).
    #[error("cannot read {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },

    /// A weights file, checkpoint or deployment file holds NaN or infinite values. A model built from it
    /// computes garbage, and some kernels (ReLU, max-pool) turn NaN into numbers, so its outputs could even
    /// look plausible; it is refused when it is read.
    #[error("tensor `{name}` in {file} holds NaN or infinite values; the file is damaged or comes from a run that diverged")]
    NonFiniteTensor { name: String, file: PathBuf },

    /// A model gave NaN or infinite outputs for an input (its weights are finite but overflow on it).
    #[error(
        "model {model} gives NaN or infinite outputs for {input}; its scores would mean nothing"
    )]
    NonFiniteOutput { model: PathBuf, input: String },

    /// A PyTorch pickle names a global outside the allow-list of `torch.load(weights_only=True)`. graft's
    /// unpickler never calls it, but Python would, so such a file is refused as torch refuses it.
    #[error("refusing {path}: its pickle names the global `{global}`, which torch.load(weights_only=True) does not allow; a file of weights needs only tensors, storages and containers, and this one may run code when Python loads it{hint}")]
    UnsafePickle {
        path: PathBuf,
        global: String,
        /// Extra advice, empty or starting with `; `.
        hint: String,
    },

    /// An output path that names one of the command's inputs (the same path, a symlink or a hard link).
    #[error("{output} is the same file as the input {input}; writing it would destroy the input: choose another output path")]
    OutputIsInput { output: PathBuf, input: PathBuf },

    /// A base model name that no model card describes.
    #[error("unknown base model `{name}`; known: {known}")]
    UnknownBase { name: String, known: String },

    /// An image that could not be opened or decoded.
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },

    /// A dataset folder that cannot be used (no classes, one class, empty).
    #[error("dataset {path}: {reason}")]
    Dataset { path: PathBuf, reason: String },

    /// A configuration value (flag, config field, hyperparameter) that is invalid.
    #[error("invalid {what}: {reason}")]
    Config { what: String, reason: String },

    /// Saved training state (optimizer state, a generator's position) that does not make sense: a damaged or
    /// foreign checkpoint. Whoever read it from a file names the file ([`Error::BadFile`]).
    #[error("saved {what} {reason}")]
    State { what: String, reason: String },

    /// Weights could not be fetched from the Hugging Face hub or found in its cache.
    #[error("hub {repo}/{file}: {reason}")]
    Hub {
        repo: String,
        file: String,
        reason: String,
    },

    /// The requested device is not available in this build or on this machine.
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },

    /// A run folder (or study) that another process is writing.
    #[error("{path} is in use by {holder}; wait for it to finish or stop it (a lock left by a process that died does not block)")]
    Busy { path: PathBuf, holder: String },

    /// Training produced a non-finite loss too often to go on.
    #[error("training diverged: {reason}")]
    Diverged { reason: String },

    /// A run would need more memory than this machine has.
    #[error("{what}: {reason}")]
    TooLarge { what: String, reason: String },

    /// A search space (TOML) entry that is invalid: unknown option, bad bounds, empty choice.
    #[error("search space `{param}`: {reason}")]
    Space { param: String, reason: String },

    /// A study's storage (SQLite file, PostgreSQL server) failed, or holds something unexpected.
    #[error("study {study}: {reason}")]
    Study { study: String, reason: String },

    /// An error raised by candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An `Io` error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A `State` error about `what`.
    pub fn state(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::State {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// A `Config` error about `what`.
    pub fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// A `Space` error about parameter `param`.
    pub fn space(param: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Space {
            param: param.into(),
            reason: reason.into(),
        }
    }

    /// A `Study` error about the study at `study` (a path or URL).
    pub fn study(study: impl Into<String>, reason: impl ToString) -> Self {
        Error::Study {
            study: study.into(),
            reason: reason.to_string(),
        }
    }

    /// A `BadFile` error about `path`.
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

//! File formats: PyTorch checkpoints (`pth`: zip and legacy pickles, unpickled without running code) and
//! safetensors weight files (`weights`: reading, key-layout reports, checked atomic writes).
//!
//! Nothing here knows about architectures or training: models/ maps these tensors onto layers, train/
//! writes its checkpoints through [`weights`].

pub mod checkpoint;
pub mod finite;
pub mod pth;
pub mod weights;

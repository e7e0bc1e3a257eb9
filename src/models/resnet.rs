//! ResNet: being written.

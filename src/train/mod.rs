//! Training: the decision policies (early stopping), checkpoints and run folders, metrics, plots and progress
//! display that the one training loop is built from.
//!
//! The loop owns nothing clever: each epoch it feeds batches to a [`progress::PassProgress`], records an
//! [`metrics::EpochMetrics`] in the [`metrics::MetricsLog`], asks [`early_stop::EarlyStopping`] for a
//! [`early_stop::Decision`] and acts on it, saving checkpoints into the [`checkpoint::RunDir`].

pub mod checkpoint;
pub mod config;
pub mod early_stop;
pub mod ema;
pub mod evaluate;
pub mod feature_store;
pub mod finetune;
mod font;
pub mod loss;
pub mod lr_find;
pub mod metrics;
pub mod mixing;
pub mod plots;
pub mod progress;
pub mod runner;
pub mod tensorboard;

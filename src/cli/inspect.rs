//! `graft inspect`: a base model's layer groups, parameter counts and what was loaded.

use super::BaseArgs;
use crate::models::pretrained::Pretrained;
use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub base: BaseArgs,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let device = crate::device::parse_device(&args.base.device)?;
    let Some(base) = args.base.base.as_deref() else {
        bail!("--base NAME is required (e.g. --base resnet18)");
    };
    let card = crate::models::base::card_for(base)?;
    let model = Pretrained::load(&card, args.base.weights.as_deref(), &device)
        .with_context(|| format!("loading base `{base}`"))?;
    let groups = model.backbone.group_names();
    let mut params = vec![0usize; groups.len() + 1];
    let mut buffers = vec![0usize; groups.len() + 1];
    for (name, var) in model.varmap.data().lock().expect("varmap lock").iter() {
        let g = model.backbone.group_of(name).unwrap_or(groups.len());
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            buffers[g] += var.elem_count();
        } else {
            params[g] += var.elem_count();
        }
    }
    println!(
        "{} ({}), {} classes, input {}x{}",
        card.name,
        card.arch,
        card.num_classes,
        card.preprocess.input_size,
        card.preprocess.input_size
    );
    println!("{}", model.report.summary());
    println!("weights from: {}", model.origin);
    println!();
    println!(
        "{:<4} {:<12} {:>14} {:>12}",
        "#", "group", "parameters", "buffers"
    );
    let mut names = groups.clone();
    names.push(format!("head ({})", model.backbone.classifier_prefix()));
    for (i, name) in names.iter().enumerate() {
        println!("{:<4} {:<12} {:>14} {:>12}", i, name, params[i], buffers[i]);
    }
    println!(
        "{:<4} {:<12} {:>14} {:>12}",
        "",
        "total",
        params.iter().sum::<usize>(),
        buffers.iter().sum::<usize>()
    );
    println!("pooled feature size: {}", model.backbone.feature_dim());
    Ok(())
}

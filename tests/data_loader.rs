//! The loader: batch shapes, determinism by seed and epoch, drop-last, class balancing, caching,
//! skipping corrupt images, and agreement with the single-image path `graft predict` uses. Folders are
//! generated in a temp dir.

use candle_core::{DType, Device, Tensor};
use graft::data::{
    load_eval_tensor, Augment, CacheConfig, ColorJitter, ImageFolder, Interpolation, Loader,
    LoaderConfig, Preprocess, Sample,
};
use image::{Rgb, RgbImage};
use std::path::Path;

/// `n` images per class, each a different noisy pattern of its own size, so that crops and flips show.
fn make_folder(root: &Path, counts: &[usize]) {
    for (c, &n) in counts.iter().enumerate() {
        let dir = root.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let (w, h) = (40 + (i as u32 * 7) % 23, 30 + (i as u32 * 5) % 17);
            let img = RgbImage::from_fn(w, h, |x, y| {
                let v = (x * 31 + y * 17 + i as u32 * 13 + c as u32 * 101) % 256;
                Rgb([v as u8, (x * 8) as u8, (y * 8 + c as u32 * 60) as u8])
            });
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("{i:03}.{ext}"))).unwrap();
        }
    }
}

fn preprocess() -> Preprocess {
    Preprocess {
        input_size: 16,
        crop_pct: 0.875,
        interpolation: Interpolation::Bicubic,
        mean: [0.5, 0.4, 0.3],
        std: [0.2, 0.25, 0.3],
        channels: 3,
    }
}

fn samples(root: &Path) -> (Vec<Sample>, usize) {
    let data = ImageFolder::open(root, 0.0, 0).unwrap();
    (data.train, data.classes.len())
}

fn collect(loader: &Loader, epoch: u64) -> Vec<(Vec<f32>, Vec<u32>, Vec<usize>)> {
    loader
        .epoch(epoch)
        .map(|b| {
            let b = b.unwrap();
            let images = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (images, b.labels.to_vec1::<u32>().unwrap(), b.indices)
        })
        .collect()
}

fn train_config(seed: u64) -> LoaderConfig {
    LoaderConfig {
        augment: Some(Augment {
            color_jitter: Some(ColorJitter {
                brightness: 0.3,
                contrast: 0.3,
                saturation: 0.3,
                hue: 0.1,
            }),
            ..Augment::default()
        }),
        ..LoaderConfig::train(4, seed)
    }
}

#[test]
fn batches_have_nchw_images_and_u32_labels() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[5, 5]);
    let (s, k) = samples(dir.path());
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::train(4, 0), &Device::Cpu).unwrap();
    let batches: Vec<_> = loader.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(
        batches.len(),
        2,
        "10 images in batches of 4, the last 2 dropped"
    );
    assert_eq!(loader.batches_per_epoch(), 2);
    for b in &batches {
        assert_eq!(b.images.dims(), &[4, 3, 16, 16]);
        assert_eq!(b.images.dtype(), DType::F32);
        assert_eq!(b.labels.dims(), &[4]);
        assert_eq!(b.labels.dtype(), DType::U32);
    }
}

#[test]
fn without_drop_last_the_last_batch_is_short_and_every_image_is_seen_once() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[5, 5]);
    let (s, k) = samples(dir.path());
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::eval(4), &Device::Cpu).unwrap();
    let sizes: Vec<usize> = collect(&loader, 0).iter().map(|b| b.2.len()).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    let order: Vec<usize> = collect(&loader, 0).into_iter().flat_map(|b| b.2).collect();
    assert_eq!(
        order,
        (0..10).collect::<Vec<_>>(),
        "evaluation keeps file order"
    );
}

#[test]
fn the_same_seed_gives_the_same_augmented_batches() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[6, 6]);
    let (s, k) = samples(dir.path());
    let a = Loader::new(s.clone(), k, preprocess(), train_config(7), &Device::Cpu).unwrap();
    let b = Loader::new(s.clone(), k, preprocess(), train_config(7), &Device::Cpu).unwrap();
    let first = collect(&a, 0);
    assert_eq!(first, collect(&b, 0), "two loaders, same seed");
    assert_eq!(
        first,
        collect(&a, 0),
        "the cached second pass draws the same crops"
    );
    let c = Loader::new(s, k, preprocess(), train_config(8), &Device::Cpu).unwrap();
    assert_ne!(first, collect(&c, 0), "another seed, other batches");
    assert_ne!(first, collect(&a, 1), "another epoch, other batches");
}

#[test]
fn epoch_e_does_not_depend_on_the_epochs_run_before_it() {
    // Exact resume: a run restarted at epoch 2 must see what an uninterrupted run sees at epoch 2.
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[6, 6]);
    let (s, k) = samples(dir.path());
    let continuous =
        Loader::new(s.clone(), k, preprocess(), train_config(3), &Device::Cpu).unwrap();
    collect(&continuous, 0);
    collect(&continuous, 1);
    let resumed = Loader::new(s, k, preprocess(), train_config(3), &Device::Cpu).unwrap();
    assert_eq!(collect(&continuous, 2), collect(&resumed, 2));
    assert_eq!(continuous.epoch_order(5), resumed.epoch_order(5));
}

#[test]
fn shuffling_visits_every_image_once_per_epoch_in_a_new_order() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[8, 8]);
    let (s, k) = samples(dir.path());
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::train(4, 1), &Device::Cpu).unwrap();
    let (e0, e1) = (loader.epoch_order(0), loader.epoch_order(1));
    assert_ne!(e0, e1);
    for order in [e0, e1] {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    }
}

#[test]
fn the_evaluation_loader_matches_the_single_image_path() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[3, 3]);
    let (s, k) = samples(dir.path());
    let loader = Loader::new(
        s.clone(),
        k,
        preprocess(),
        LoaderConfig::eval(4),
        &Device::Cpu,
    )
    .unwrap();
    for batch in loader.epoch(0) {
        let batch = batch.unwrap();
        for (row, &i) in batch.indices.iter().enumerate() {
            let single = load_eval_tensor(&s[i].path, &preprocess(), &Device::Cpu).unwrap();
            let from_batch = batch.images.get(row).unwrap();
            let diff = (single - from_batch)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(
                diff.to_scalar::<f32>().unwrap(),
                0.0,
                "{}",
                s[i].path.display()
            );
        }
        let labels = batch.labels.to_vec1::<u32>().unwrap();
        let want: Vec<u32> = batch.indices.iter().map(|&i| s[i].label as u32).collect();
        assert_eq!(labels, want);
    }
}

#[test]
fn a_disk_cache_serves_later_epochs_and_later_runs_with_the_same_pixels() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(&dir.path().join("data"), &[3, 3]);
    let (s, k) = samples(&dir.path().join("data"));
    let cache = CacheConfig {
        memory_bytes: 0,
        disk_dir: Some(dir.path().join("cache")),
    };
    let config = LoaderConfig {
        cache,
        batch_size: 3,
        ..train_config(5)
    };
    let loader = Loader::new(s.clone(), k, preprocess(), config.clone(), &Device::Cpu).unwrap();
    let first = collect(&loader, 0);
    assert_eq!(loader.cache_stats().disk_images, 6);
    assert_eq!(loader.cache_stats().memory_images, 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        6
    );
    // A new loader over unchanged files (a later run) reads the disk cache instead of decoding.
    let later_run = Loader::new(s, k, preprocess(), config, &Device::Cpu).unwrap();
    assert_eq!(first, collect(&later_run, 0));
    assert_eq!(
        later_run.cache_stats().disk_images,
        0,
        "nothing new had to be written"
    );
}

#[test]
fn the_memory_cache_holds_every_image_after_the_first_epoch() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[4, 4]);
    let (s, k) = samples(dir.path());
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::eval(3), &Device::Cpu).unwrap();
    let first = collect(&loader, 0);
    let stats = loader.cache_stats();
    assert_eq!(stats.memory_images, 8);
    assert_eq!(
        stats.memory_bytes,
        8 * 16 * 16 * 3,
        "evaluation caches the final crop"
    );
    assert_eq!(first, collect(&loader, 1));
}

#[test]
fn balanced_sampling_evens_out_the_classes() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[36, 4]);
    let (s, k) = samples(dir.path());
    let config = LoaderConfig {
        balanced: true,
        ..LoaderConfig::train(8, 0)
    };
    let loader = Loader::new(s.clone(), k, preprocess(), config, &Device::Cpu).unwrap();
    let (mut minority, mut total) = (0, 0);
    for epoch in 0..10 {
        let order = loader.epoch_order(epoch);
        total += order.len();
        minority += order.iter().filter(|&&i| s[i].label == 1).count();
    }
    // 10% of the images, drawn with probability 1/2: about 200 of 400 (seeded, so fixed).
    assert_eq!(total, 400);
    assert!(
        (150..=250).contains(&minority),
        "minority drawn {minority} times of {total}"
    );
}

#[test]
fn a_corrupt_image_is_skipped_reported_and_counted_in_every_epoch() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[3, 3]);
    let bad = dir.path().join("class1/001.jpg");
    std::fs::write(&bad, b"\xFF\xD8\xFF broken").unwrap();
    let (s, k) = samples(dir.path());
    let bad_index = s.iter().position(|x| x.path == bad).unwrap();
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::eval(6), &Device::Cpu).unwrap();
    for epoch in 0..2 {
        let batches = collect(&loader, epoch);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].2.len(), 5);
        assert!(!batches[0].2.contains(&bad_index));
        assert_eq!(batches[0].0.len(), 5 * 3 * 16 * 16);
    }
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].0, bad);
}

#[test]
fn a_batch_of_only_corrupt_images_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[2, 2]);
    for name in ["class0/000.png", "class0/001.jpg"] {
        std::fs::write(dir.path().join(name), b"nothing").unwrap();
    }
    let (s, k) = samples(dir.path());
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::eval(2), &Device::Cpu).unwrap();
    let batches = collect(&loader, 0);
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].2, vec![2, 3]);
    assert_eq!(loader.skipped().len(), 2);
}

#[test]
fn stopping_an_epoch_early_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[8, 8]);
    let (s, k) = samples(dir.path());
    let config = LoaderConfig {
        prefetch: 2,
        ..LoaderConfig::eval(2)
    };
    let loader = Loader::new(s, k, preprocess(), config, &Device::Cpu).unwrap();
    let first: Vec<_> = loader.epoch(0).take(1).collect();
    assert_eq!(first.len(), 1);
}

#[test]
fn too_few_images_for_one_dropped_batch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[2, 2]);
    let (s, k) = samples(dir.path());
    let err = Loader::new(s, k, preprocess(), LoaderConfig::train(8, 0), &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("fewer than one batch of 8"),
        "{err}"
    );
}

#[test]
fn augmentation_changes_pixels_but_keeps_them_in_the_normalised_range() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[4, 4]);
    let (s, k) = samples(dir.path());
    let plain = Loader::new(
        s.clone(),
        k,
        preprocess(),
        LoaderConfig::eval(8),
        &Device::Cpu,
    )
    .unwrap();
    let aug = Loader::new(
        s,
        k,
        preprocess(),
        LoaderConfig {
            shuffle: false,
            batch_size: 8,
            ..train_config(0)
        },
        &Device::Cpu,
    )
    .unwrap();
    let p = collect(&plain, 0);
    let a = collect(&aug, 0);
    assert_eq!(p[0].2, a[0].2, "same samples");
    assert_ne!(p[0].0, a[0].0);
    let pre = preprocess();
    let (lo, hi) = (0..3).fold((f32::MAX, f32::MIN), |(lo, hi), c| {
        (
            lo.min(-pre.mean[c] / pre.std[c]),
            hi.max((1.0 - pre.mean[c]) / pre.std[c]),
        )
    });
    let t = Tensor::new(a[0].0.as_slice(), &Device::Cpu).unwrap();
    let (min, max) = (
        t.min_all().unwrap().to_scalar::<f32>().unwrap(),
        t.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!(
        min >= lo - 1e-5 && max <= hi + 1e-5,
        "{min} {max} outside [{lo}, {hi}]"
    );
}

#[test]
fn the_next_batch_is_prepared_while_the_current_one_is_used_and_no_further() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path(), &[6, 6]);
    let (s, k) = samples(dir.path());
    let loader = Loader::new(s, k, preprocess(), LoaderConfig::eval(3), &Device::Cpu).unwrap();
    let mut epoch = loader.epoch(0);
    let first = epoch.next().unwrap().unwrap();
    assert_eq!(first.indices, vec![0, 1, 2]);
    // While we hold batch 0, the background thread decodes batch 1 (its images land in the cache),
    // then waits for us: with prefetch 1 it never starts batch 2. This waits for the thread, it does
    // not time it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while loader.cache_stats().memory_images < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "batch 1 was never prepared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        loader.cache_stats().memory_images,
        6,
        "ran ahead of prefetch 1"
    );
    let rest: Vec<_> = epoch.map(|b| b.unwrap().indices).collect();
    assert_eq!(rest, vec![vec![3, 4, 5], vec![6, 7, 8], vec![9, 10, 11]]);
}

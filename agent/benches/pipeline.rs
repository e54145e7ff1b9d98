//! Hot-path benchmarks: CRI parsing, the default relabel rules, the reference ops
//! pipeline (cri -> timestamp -> labelDrop) over realistic CRI lines, and the push
//! encoder (batching a 1 MiB batch, protobuf encoding and snappy compression). Throughput is in
//! lines, so `lines/s` compares directly with Promtail's lines per CPU second.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use logpipe_agent::config::{Limits, Stage};
use logpipe_agent::cri::parse_cri;
use logpipe_agent::entry::{Entry, LabelSet};
use logpipe_agent::loki::batch::Batch;
use logpipe_agent::relabel::{Relabeler, pod_meta_labels};
use logpipe_agent::stages::{Pipeline, PipelineStats};
use logpipe_agent::tail::ack::{AckToken, Pending};

const OPS: &str =
    "- cri: {}\n- timestamp: {source: time, format: RFC3339}\n- labelDrop: [filename]\n";

/// 1000 CRI lines of 60 to 400 bytes, one in 50 split into P + F, stdout and stderr.
fn cri_lines() -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..1000u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 60 + (seed % 340) as usize;
        let stream = if i % 7 == 0 { "stderr" } else { "stdout" };
        let body: String = (0..len)
            .map(|k| (b'a' + ((seed >> (k % 60)) % 26) as u8) as char)
            .collect();
        let time = format!(
            "2024-01-15T10:20:{:02}.{:09}Z",
            i % 60,
            (seed % 1_000_000_000)
        );
        if i % 50 == 0 {
            let (head, tail) = body.split_at(len / 2);
            lines.push(format!("{time} {stream} P {head}").into_bytes());
            lines.push(format!("{time} {stream} F {tail}").into_bytes());
        } else {
            lines.push(format!("{time} {stream} F level=info msg=\"{body}\"").into_bytes());
        }
    }
    lines
}

fn stream_labels() -> LabelSet {
    Arc::new(BTreeMap::from([
        ("app".to_string(), "checkout".to_string()),
        ("container".to_string(), "main".to_string()),
        (
            "filename".to_string(),
            "/var/log/pods/shop_checkout-7d4b9c8f6d-x2x9z_uid/main/0.log".to_string(),
        ),
        ("namespace".to_string(), "shop".to_string()),
        ("node_name".to_string(), "node-a".to_string()),
        ("pod".to_string(), "checkout-7d4b9c8f6d-x2x9z".to_string()),
    ]))
}

fn bench_cri_parse(c: &mut Criterion) {
    let lines = cri_lines();
    let mut group = c.benchmark_group("cri_parse");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("1000_lines", |b| {
        b.iter(|| {
            for line in &lines {
                let _ = black_box(parse_cri(black_box(line)));
            }
        })
    });
    group.finish();
}

fn bench_relabel(c: &mut Criterion) {
    let relabeler = match Relabeler::new(&[]) {
        Ok(relabeler) => relabeler,
        Err(error) => return eprintln!("default rules do not compile: {error}"),
    };
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "checkout".to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            "checkout-prod".to_string(),
        ),
        ("pod-template-hash".to_string(), "7d4b9c8f6d".to_string()),
    ]);
    let annotations = BTreeMap::from([("prometheus.io/scrape".to_string(), "true".to_string())]);
    let meta = pod_meta_labels(
        "shop",
        "checkout-7d4b9c8f6d-x2x9z",
        "0b9f3c1e-1111-2222-3333-444455556666",
        "node-a",
        "main",
        &labels,
        &annotations,
        Some(("ReplicaSet", "checkout-7d4b9c8f6d")),
    );
    c.bench_function("relabel_default_rules", |b| {
        b.iter(|| black_box(relabeler.apply(black_box(&meta))))
    });
}

fn bench_ops_pipeline(c: &mut Criterion) {
    let stages: Vec<Stage> = match serde_yaml::from_str(OPS) {
        Ok(stages) => stages,
        Err(error) => return eprintln!("reference pipeline does not parse: {error}"),
    };
    let pipeline = match Pipeline::new(&stages, &Limits::default()) {
        Ok(pipeline) => pipeline,
        Err(error) => return eprintln!("reference pipeline does not compile: {error}"),
    };
    let lines = cri_lines();
    let labels = stream_labels();
    let mut group = c.benchmark_group("ops_pipeline");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("1000_lines", |b| {
        let mut state = pipeline.stream();
        let mut out = Vec::with_capacity(lines.len());
        let mut stats = PipelineStats::default();
        b.iter(|| {
            out.clear();
            let mut offset = 0u64;
            for line in &lines {
                let start = offset;
                offset += line.len() as u64 + 1;
                pipeline.push(
                    &mut state,
                    line,
                    start,
                    offset,
                    &labels,
                    1_705_314_030_000_000_000,
                    &mut out,
                    &mut stats,
                );
            }
            black_box(&out);
        })
    });
    group.finish();
}

/// Entries of a 1 MiB batch (the default `batchBytes`) over 40 streams, as the shipper
/// builds them: lines from [`cri_lines`], one label set per stream.
fn batch_entries() -> Vec<Pending> {
    let lines = cri_lines();
    let streams: Vec<LabelSet> = (0..40)
        .map(|i| {
            let mut labels = (*stream_labels()).clone();
            labels.insert("pod".into(), format!("checkout-7d4b9c8f6d-{i:05}"));
            Arc::new(labels)
        })
        .collect();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut seq = 0u64;
    while bytes < 1024 * 1024 {
        let raw = &lines[seq as usize % lines.len()];
        // The content after `<time> <stream> <tag> `, as the cri stage leaves it.
        let line = String::from_utf8_lossy(raw.splitn(4, |&b| b == b' ').nth(3).unwrap_or(raw))
            .into_owned();
        bytes += line.len();
        out.push(Pending {
            entry: Entry {
                timestamp_ns: 1_705_314_030_000_000_000 + seq as i64 * 1000,
                line,
                labels: streams[seq as usize % streams.len()].clone(),
                structured_metadata: Vec::new(),
                end_offset: seq,
                tenant: None,
            },
            token: AckToken {
                file: seq % 40,
                seq,
            },
            bytes: 0,
        });
        seq += 1;
    }
    out
}

fn bench_push_encoder(c: &mut Criterion) {
    let entries = batch_entries();
    let line_bytes: usize = entries.iter().map(|p| p.entry.line.len()).sum();
    let external = BTreeMap::new();
    let mut group = c.benchmark_group("push_encoder");
    group.throughput(Throughput::Bytes(line_bytes as u64));
    // Cloning the input is part of every iteration (the batch consumes its entries); it
    // is measured alone too, so it can be subtracted.
    group.bench_function("clone_input_1mib", |b| {
        b.iter(|| black_box(entries.clone()))
    });
    group.bench_function("batch_push_1mib", |b| {
        b.iter(|| {
            let mut batch = Batch::default();
            for pending in entries.clone() {
                batch.push(pending);
            }
            black_box(batch.len())
        })
    });
    group.bench_function("batch_push_encode_snappy_1mib", |b| {
        b.iter(|| {
            let mut batch = Batch::default();
            for pending in entries.clone() {
                batch.push(pending);
            }
            black_box(batch.encode(&external).map(|e| e.body.len()).unwrap_or(0))
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_cri_parse,
    bench_relabel,
    bench_ops_pipeline,
    bench_push_encoder
);
criterion_main!(benches);

//! Gate comparison throughput: 2,048 positions of 248,320-vocab f16 logits (oracle + one candidate,
//! synthesised), compared by `qgate::gate::compare::compare`. Prints GB/s of capture data processed
//! (both captures' logits bytes / wall time). Run: `cargo bench --bench gate_compare`.
use qgate::capture::{Capture, CaptureMeta, CaptureWriter, TensorSpec};
use qgate::gate::compare::compare;
use qgate::gate::policy::Policy;
use safetensors::Dtype;
use std::time::Instant;

const V: usize = 248_320;
const SEQS: usize = 4;
const T: usize = 512;

fn synth(path: &std::path::Path, label: &str, shift: f32) {
    let mut specs = Vec::new();
    for s in 0..SEQS {
        specs.push(TensorSpec::new(format!("seq.{s}.tokens"), Dtype::I64, &[T]));
        specs.push(TensorSpec::new(
            format!("seq.{s}.logits"),
            Dtype::F16,
            &[T, V],
        ));
    }
    let mut w =
        CaptureWriter::create(path, &CaptureMeta::new(label, "bench", "f16", V), &specs).unwrap();
    let mut row = vec![0f32; V];
    for s in 0..SEQS {
        w.write_i64(&(0..T as i64).collect::<Vec<_>>()).unwrap();
        for t in 0..T {
            let mut x = (s * 7919 + t * 104_729) as u32 | 1;
            for (j, r) in row.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *r = (x % 4096) as f32 / 512.0 - 6.0 + if j == (t * 31) % V { 8.0 } else { 0.0 };
            }
            if shift != 0.0 {
                for (j, r) in row.iter_mut().enumerate() {
                    *r += shift * (((j * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5);
                }
            }
            w.write_f16(&row).unwrap();
        }
    }
    w.finish().unwrap();
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (o, c) = (
        dir.path().join("oracle.capture.safetensors"),
        dir.path().join("cand.capture.safetensors"),
    );
    eprintln!("synthesising 2 × {SEQS}×{T} rows × {V} f16 …");
    synth(&o, "oracle", 0.0);
    synth(&c, "cand", 0.05);
    let (oc, cc) = (Capture::open(&o).unwrap(), Capture::open(&c).unwrap());
    let bytes = 2.0 * (SEQS * T * V * 2) as f64;
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    let policy = Policy::load(None).unwrap(); // the release policy: prob margins
    for round in 0..3 {
        let t0 = Instant::now();
        let (views, res) = compare(&oc, &[&cc], &policy).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(views.len(), SEQS * T);
        assert_eq!(res[0].positions.len(), SEQS * T);
        eprintln!("round {round}: {dt:.3} s, {:.2} GB/s", bytes / dt / 1e9);
        best = best.min(dt);
    }
    println!(
        "gate comparison: {} positions × {V} vocab, f16 oracle + candidate ({:.2} GB of logits), {threads} threads: best {best:.3} s = {:.2} GB/s",
        SEQS * T,
        bytes / 1e9,
        bytes / best / 1e9
    );
}

//! Palettization: one `2^bits`-entry LUT per group of 32 consecutive output rows (coreai_formats.md §5.2),
//! clustered with a deterministic 1-D k-means.
//!
//! As coreai-opt's default "fast mode", each value is first cast to f16 and rounded to 4 decimals; the
//! clustering runs on the distinct rounded values weighted by their counts. Initialisation: the `k`
//! centroids are the distinct values at the quantiles `(j + ½)/k` of the sorted distinct values (so they are
//! distinct); then at most `MAX_ITER` Lloyd iterations (assignment by midpoints between sorted centroids —
//! a value exactly on a midpoint goes to the lower centroid — and weighted means; an empty cluster keeps
//! its centroid), stopping early once no centroid moves. With at most `k` distinct values the LUT is those
//! values, padded with the last. LUT entries are stored in the scale dtype (f16 by default, the weight
//! dtype of an fp16 export). Each group is clustered on its own, sequentially, so the result is identical
//! for any number of threads.
use super::linear::ScaleDtype;
use rayon::prelude::*;

pub const MAX_ITER: usize = 32;
/// Values are rounded to this many decimals before clustering (coreai-opt `rounding_precision`).
const SCALE: f64 = 1e4;

/// `w` rounded to f16. Fast path: a value whose mantissa fits f16's 10 bits in f16's normal exponent range
/// (every bf16 checkpoint value there) is already exact.
#[inline(always)]
fn f16_round(w: f32) -> f32 {
    let b = w.to_bits();
    let exp = ((b >> 23) & 0xff) as i32 - 127;
    if b & 0x1fff == 0 && (-14..=15).contains(&exp) {
        w
    } else {
        half::f16::from_f32(w).to_f32()
    }
}

fn key(w: f32) -> i32 {
    let v = f16_round(w) as f64;
    if !v.is_finite() {
        return 0;
    }
    (v * SCALE)
        .round_ties_even()
        .clamp(i32::MIN as f64, i32::MAX as f64) as i32
}

/// Distinct keys (ascending) and their counts; with a dense key range also the offset of its first key
/// (the counting path), which `palettize_group` reuses as a lookup table.
fn histogram(keys: &[i32]) -> (Vec<i32>, Vec<u32>, Option<i32>) {
    let (mut lo, mut hi) = (i32::MAX, i32::MIN);
    for &k in keys.iter() {
        lo = lo.min(k);
        hi = hi.max(k);
    }
    let (mut vals, mut counts) = (Vec::new(), Vec::new());
    if keys.is_empty() {
        return (vals, counts, None);
    }
    let range = (hi as i64 - lo as i64 + 1) as usize;
    let dense = range <= 4 * keys.len() + 1024;
    if dense {
        let mut bins = vec![0u32; range];
        for &k in keys.iter() {
            bins[(k as i64 - lo as i64) as usize] += 1;
        }
        for (i, &c) in bins.iter().enumerate() {
            if c > 0 {
                vals.push((lo as i64 + i as i64) as i32);
                counts.push(c);
            }
        }
    } else {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        for &k in keys.iter() {
            if vals.last() == Some(&k) {
                if let Some(c) = counts.last_mut() {
                    *c += 1;
                }
            } else {
                vals.push(k);
                counts.push(1);
            }
        }
    }
    (vals, counts, dense.then_some(lo))
}

/// Cluster one group's values into at most `k` centroids (ascending, f64, before the LUT rounding).
pub fn cluster(values: &[f32], k: usize) -> Vec<f64> {
    let keys: Vec<i32> = values.iter().map(|&w| key(w)).collect();
    let (uk, counts, _) = histogram(&keys);
    cluster_distinct(&uk, &counts, k)
}

/// Cluster distinct keys (ascending) weighted by their counts.
fn cluster_distinct(uk: &[i32], counts: &[u32], k: usize) -> Vec<f64> {
    let u: Vec<f64> = uk.iter().map(|&k| k as f64 / SCALE).collect();
    if u.is_empty() {
        return vec![0.0; k];
    }
    if u.len() <= k {
        let mut c = u.clone();
        let last = c[c.len() - 1];
        c.resize(k, last);
        return c;
    }
    // prefix sums of counts and count·value
    let mut pc = vec![0f64; u.len() + 1];
    let mut ps = vec![0f64; u.len() + 1];
    for i in 0..u.len() {
        pc[i + 1] = pc[i] + counts[i] as f64;
        ps[i + 1] = ps[i] + counts[i] as f64 * u[i];
    }
    let n = u.len();
    let mut c: Vec<f64> = (0..k).map(|j| u[((2 * j + 1) * n) / (2 * k)]).collect();
    for _ in 0..MAX_ITER {
        let mut next = c.clone();
        let mut lo = 0usize;
        for j in 0..k {
            let hi = if j + 1 == k {
                n
            } else {
                let b = 0.5 * (c[j] + c[j + 1]);
                lo + u[lo..].partition_point(|&x| x <= b)
            };
            let cnt = pc[hi] - pc[lo];
            if cnt > 0.0 {
                next[j] = (ps[hi] - ps[lo]) / cnt;
            }
            lo = hi;
        }
        next.sort_by(|a, b| a.total_cmp(b));
        if next == c {
            break;
        }
        c = next;
    }
    c
}

/// Index of the centroid nearest to `v` (midpoint ties to the lower one); `c` ascending.
fn nearest(c: &[f64], v: f64) -> usize {
    // first j whose upper midpoint is ≥ v
    let mut lo = 0;
    let mut hi = c.len() - 1;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if v <= 0.5 * (c[mid] + c[mid + 1]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Palettize one group in place; returns its LUT (rounded to the scale dtype).
pub fn palettize_group(values: &mut [f32], bits: u8, sd: ScaleDtype) -> Vec<f32> {
    let k = 1usize << bits;
    let keys: Vec<i32> = values.iter().map(|&w| key(w)).collect();
    let (uk, counts, dense_from) = histogram(&keys);
    let c = cluster_distinct(&uk, &counts, k);
    let lut: Vec<f32> = c.iter().map(|&x| sd.round(x as f32)).collect();
    // each distinct key's LUT entry, then every weight through its key
    let per_key: Vec<f32> = uk
        .iter()
        .map(|&q| lut[nearest(&c, q as f64 / SCALE)])
        .collect();
    match dense_from {
        Some(lo) => {
            let span = uk
                .last()
                .map_or(0, |&h| (h as i64 - lo as i64 + 1) as usize);
            let mut table = vec![0f32; span];
            for (&q, &v) in uk.iter().zip(&per_key) {
                table[(q as i64 - lo as i64) as usize] = v;
            }
            for (w, &q) in values.iter_mut().zip(&keys) {
                *w = table[(q as i64 - lo as i64) as usize];
            }
        }
        None => {
            for (w, &q) in values.iter_mut().zip(&keys) {
                *w = per_key[uk.partition_point(|&x| x < q)];
            }
        }
    }
    lut
}

/// Palettize a row-major weight whose rows (`rows = data.len() / cols`) split into groups of `group`
/// consecutive rows. The caller checks that `rows % group == 0`.
pub fn palettize(data: &mut [f32], cols: usize, bits: u8, group: usize, sd: ScaleDtype) {
    data.par_chunks_mut(cols * group).for_each(|g| {
        palettize_group(g, bits, sd);
    });
}

/// Bytes of the indices plus the LUTs.
pub fn storage_bytes(numel: u64, cols: u64, bits: u8, group: u64, sd: ScaleDtype) -> u64 {
    let groups = numel / (cols * group);
    (numel * bits as u64).div_ceil(8) + groups * (1u64 << bits) * sd.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        // deterministic pseudo-normal values (sum of uniforms), std ≈ 0.02
        let mut s = seed;
        (0..rows * cols)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..4 {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                }
                acc * 0.035
            })
            .collect()
    }

    #[test]
    fn f16_fast_path_is_exact() {
        let mut x = 1e-9f32;
        while x < 1e6 {
            for v in [x, -x, half::bf16::from_f32(x).to_f32(), x * 1.000_123] {
                assert_eq!(
                    f16_round(v).to_bits(),
                    half::f16::from_f32(v).to_f32().to_bits(),
                    "{v}"
                );
            }
            x *= 1.37;
        }
        assert_eq!(f16_round(0.0), 0.0);
    }

    #[test]
    fn few_distinct_values_are_reproduced_exactly() {
        let vals = [0.5f32, -0.25, 0.125, 0.0];
        let mut g: Vec<f32> = (0..32 * 3).map(|i| vals[i % 4]).collect();
        let orig = g.clone();
        let lut = palettize_group(&mut g, 4, ScaleDtype::F16);
        assert_eq!(lut.len(), 16);
        assert_eq!(&lut[..4], &[-0.25, 0.0, 0.125, 0.5]);
        assert!(lut[4..].iter().all(|&x| x == 0.5), "padded with the last");
        assert_eq!(g, orig);
    }

    #[test]
    fn lut_size_and_assignment_on_a_small_matrix() {
        let (rows, cols) = (64, 48);
        let m = matrix(rows, cols, 7);
        let mut q = m.clone();
        palettize(&mut q, cols, 4, 32, ScaleDtype::F32);
        for g in 0..2 {
            let orig = &m[g * 32 * cols..(g + 1) * 32 * cols];
            let got = &q[g * 32 * cols..(g + 1) * 32 * cols];
            let c = cluster(orig, 16);
            assert_eq!(c.len(), 16);
            assert!(c.windows(2).all(|w| w[0] < w[1]), "distinct, ascending");
            let mut distinct: Vec<f32> = got.to_vec();
            distinct.sort_by(|a, b| a.total_cmp(b));
            distinct.dedup();
            assert!(distinct.len() <= 16);
            // every weight maps to its nearest centroid
            for (&w, &p) in orig.iter().zip(got) {
                let v = key(w) as f64 / SCALE;
                let best = c
                    .iter()
                    .map(|&x| (x - v).abs())
                    .fold(f64::INFINITY, f64::min);
                assert!(((p as f64) - v).abs() <= best + 1e-6, "{w} → {p}");
            }
            // clustering error well below the spread of the weights
            let mse: f64 = orig
                .iter()
                .zip(got)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / orig.len() as f64;
            assert!(mse.sqrt() < 0.004, "rmse {}", mse.sqrt());
        }
        // 8 bits is finer than 4 bits
        let mut q8 = m.clone();
        palettize(&mut q8, cols, 8, 32, ScaleDtype::F32);
        let err = |q: &[f32]| -> f64 { m.iter().zip(q).map(|(a, b)| ((a - b) as f64).abs()).sum() };
        assert!(err(&q8) < err(&q) / 4.0);
        assert_eq!(
            storage_bytes((rows * cols) as u64, cols as u64, 4, 32, ScaleDtype::F16),
            1536 + 2 * 16 * 2
        );
    }

    #[test]
    fn deterministic_across_runs_and_thread_counts() {
        let (rows, cols) = (128, 256);
        let m = matrix(rows, cols, 11);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut q = m.clone();
            pool.install(|| palettize(&mut q, cols, 6, 32, ScaleDtype::F16));
            q.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_eq!(a, run(3));
        assert_eq!(a, run(8));
    }
}

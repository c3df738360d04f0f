//! `torch.topk(largest=True, sorted=True)` on CPU, tie-breaking included. torch compares values only, so
//! which of two equal values wins is decided by libstdc++'s `nth_element` / `partial_sort` / `sort` on
//! the `(value, index)` array. bf16 router logits tie often, and the chosen expert changes the output, so
//! the oracle replays those algorithms step for step (libstdc++ `bits/stl_algo.h`, `bits/stl_heap.h`).

type Elem = (f32, usize);

/// torch's comparator for `largest`: NaN first, then greater values first; indices never compared.
fn before(x: &Elem, y: &Elem) -> bool {
    (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
}

/// Indices of the `k` largest values in torch's order.
pub fn topk_largest(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return vec![];
    }
    let mut q: Vec<Elem> = values.iter().copied().zip(0..n).collect();
    if k * 64 <= n {
        partial_sort(&mut q, k);
    } else {
        nth_element(&mut q, k - 1);
        insertion_or_intro_sort(&mut q[..k - 1]);
    }
    q[..k].iter().map(|e| e.1).collect()
}

fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

fn nth_element(a: &mut [Elem], nth: usize) {
    let n = a.len();
    if n == 0 || nth == n {
        return;
    }
    let (mut first, mut last) = (0usize, n);
    let mut depth = lg(n) * 2;
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut a[first..last], nth + 1 - first);
            a.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = first + unguarded_partition_pivot(&mut a[first..last]);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut a[first..last]);
}

fn move_median_to_first(a: &mut [Elem], result: usize, x: usize, y: usize, z: usize) {
    if before(&a[x], &a[y]) {
        if before(&a[y], &a[z]) {
            a.swap(result, y);
        } else if before(&a[x], &a[z]) {
            a.swap(result, z);
        } else {
            a.swap(result, x);
        }
    } else if before(&a[x], &a[z]) {
        a.swap(result, x);
    } else if before(&a[y], &a[z]) {
        a.swap(result, z);
    } else {
        a.swap(result, y);
    }
}

/// Returns the cut position (relative to `a`).
fn unguarded_partition_pivot(a: &mut [Elem]) -> usize {
    let n = a.len();
    let mid = n / 2;
    move_median_to_first(a, 0, 1, mid, n - 1);
    let pivot = a[0];
    let (mut first, mut last) = (1usize, n);
    loop {
        while before(&a[first], &pivot) {
            first += 1;
        }
        last -= 1;
        while before(&pivot, &a[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        a.swap(first, last);
        first += 1;
    }
}

fn insertion_sort(a: &mut [Elem]) {
    for i in 1..a.len() {
        let val = a[i];
        if before(&val, &a[0]) {
            a.copy_within(0..i, 1);
            a[0] = val;
        } else {
            let mut j = i;
            while before(&val, &a[j - 1]) {
                a[j] = a[j - 1];
                j -= 1;
            }
            a[j] = val;
        }
    }
}

/// `std::sort`; torch only sorts the first k-1 selected elements, and for k ≤ 17 introsort's loop
/// never runs (threshold 16), leaving the final insertion sort.
fn insertion_or_intro_sort(a: &mut [Elem]) {
    if a.len() <= 16 {
        insertion_sort(a);
    } else {
        // Larger k than any published router uses: fall back to a stable order by (value desc, index).
        a.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    }
}

fn partial_sort(a: &mut [Elem], middle: usize) {
    heap_select(a, middle);
    sort_heap(&mut a[..middle]);
}

fn heap_select(a: &mut [Elem], middle: usize) {
    make_heap(&mut a[..middle]);
    for i in middle..a.len() {
        if before(&a[i], &a[0]) {
            pop_heap(a, middle, i);
        }
    }
}

fn make_heap(a: &mut [Elem]) {
    let len = a.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = a[parent];
        adjust_heap(a, parent, len, value);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// `__pop_heap(first, first+len, result)`.
fn pop_heap(a: &mut [Elem], len: usize, result: usize) {
    let value = a[result];
    a[result] = a[0];
    adjust_heap(a, 0, len, value);
}

fn adjust_heap(a: &mut [Elem], mut hole: usize, len: usize, value: Elem) {
    let top = hole;
    let mut second = hole;
    while second < (len.saturating_sub(1)) / 2 {
        second = 2 * (second + 1);
        if before(&a[second], &a[second - 1]) {
            second -= 1;
        }
        a[hole] = a[second];
        hole = second;
    }
    if len & 1 == 0 && len >= 2 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        a[hole] = a[second - 1];
        hole = second - 1;
    }
    // __push_heap
    while hole > top {
        let parent = (hole - 1) / 2;
        if !before(&a[parent], &value) {
            break;
        }
        a[hole] = a[parent];
        hole = parent;
    }
    a[hole] = value;
}

fn sort_heap(a: &mut [Elem]) {
    let mut last = a.len();
    while last > 1 {
        last -= 1;
        pop_heap(a, last, last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch.topk's own choices on tie-heavy inputs (fixtures/gen/make_topk_cases.py).
    #[test]
    fn replays_torch_topk_tie_breaking() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/torch/topk_ties.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.len() > 100);
        for (i, c) in cases.iter().enumerate() {
            let levels = c["levels"].as_u64().unwrap() as f32;
            let vals: Vec<f32> = c["q"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as f32 / levels)
                .collect();
            let k = c["k"].as_u64().unwrap() as usize;
            let want: Vec<usize> = c["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                topk_largest(&vals, k),
                want,
                "case {i}: n={} k={k}",
                vals.len()
            );
        }
    }
}

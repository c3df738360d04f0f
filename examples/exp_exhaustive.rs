use rayon::prelude::*;
fn main() {
    println!(
        "vector path active: {}",
        qgate::model::expf::vector_path_active()
    );
    let bad: u64 = (0u32..65536)
        .into_par_iter()
        .map(|hi| {
            let mut xs: Vec<f32> = (0u32..65536)
                .map(|lo| f32::from_bits(hi << 16 | lo))
                .collect();
            let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
            qgate::model::expf::exp_in_place(&mut xs);
            xs.iter()
                .zip(&want)
                .filter(|(g, w)| !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())))
                .count() as u64
        })
        .sum();
    println!("mismatches over all 2^32 inputs: {bad}");
}

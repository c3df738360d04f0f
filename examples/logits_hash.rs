//! Prints a hash of the logits of one forward (numerics check across builds) and writes them to a file.
use qgate::model::{precision::Precision, Model};
use std::hash::{Hash, Hasher};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let prec = Precision::parse(&a[2]).ok_or("dtype")?;
    let t: usize = a[3].parse()?;
    let model = Model::load(std::path::Path::new(&a[1]), prec)?;
    let ids = qgate::plan::random_token_ids(t, model.cfg.vocab_size);
    let mut cache = model.new_cache();
    let mut all: Vec<f32> = model.forward(&ids, &mut cache)?.flatten_all()?.to_vec1()?;
    // then two cached single steps (recurrent path)
    for &id in &ids[..2] {
        all.extend(
            model
                .forward(&[id], &mut cache)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in &all {
        f.to_bits().hash(&mut h);
    }
    println!("{} T={t}: hash {:016x}", prec.name(), h.finish());
    if let Some(path) = a.get(4) {
        let bytes: Vec<u8> = all.iter().flat_map(|f| f.to_le_bytes()).collect();
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

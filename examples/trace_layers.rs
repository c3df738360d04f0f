//! Developer tool: print the per-layer residual stream of the oracle for one plan sequence as raw f32
//! (`OUT.layerN.f32`), for layer-by-layer comparison against HF's `output_hidden_states`.
use qgate::capture::Capture;
use qgate::model::{precision::Precision, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: trace_layers MODEL_DIR DTYPE PLAN SEQ OUT_PREFIX");
        std::process::exit(2);
    }
    let prec = Precision::parse(&a[2]).ok_or("bad dtype")?;
    let model = Model::load(std::path::Path::new(&a[1]), prec)?;
    let tokens: Vec<u32> = Capture::open(&a[3])?
        .seq(a[4].parse()?)
        .tokens
        .iter()
        .map(|&t| t as u32)
        .collect();
    let mut cache = model.new_cache();
    let mut trace = Vec::new();
    let last = model.hidden_states_traced(&tokens, &mut cache, Some(&mut trace))?;
    trace.push(last);
    for (i, t) in trace.iter().enumerate() {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(format!("{}.layer{i}.f32", a[5]), bytes)?;
    }
    Ok(())
}

//! The layer-range forward (what the sensitivity map's prefix reuse runs): the embedding, layers `0..k`
//! with their residual streams stored, then layers `k..` resumed from the stored stream of layer `k` with
//! a fresh cache, the final norm and the head, gives logits bit-identical to the full forward — on every
//! fixture model, in f32, bf16 and f16, for every split point; and a layer loaded on its own
//! (`load_layer`) running in place of the model's own changes nothing when it is the same layer.
mod common;
use common::bits;
use qgate::model::precision::Precision;
use qgate::model::weights::WeightStore;
use qgate::model::Model;
use std::path::PathBuf;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

#[test]
fn layer_range_forward_from_stored_states_is_bit_identical() {
    let tokens: Vec<u32> = (0..70u32).map(|i| (i * 37 + 11) % 380 + 3).collect();
    for model in [
        "dense-vl-tied",
        "dense-gva-untied",
        "moe-fused",
        "planted-mlp2",
    ] {
        let dir = fixture(&format!("models/{model}"));
        for prec in [Precision::F32, Precision::BF16, Precision::F16] {
            let m = Model::load(&dir, prec).unwrap();
            let mut cache = m.new_cache();
            let full = bits(&m.forward(&tokens, &mut cache).unwrap());
            // the stored streams: embedding, then after every layer
            let x0 = m.embed_tokens(&tokens).unwrap();
            let mut trace = Vec::new();
            let mut cache = m.new_cache();
            m.forward_layers(0, &x0, &mut cache, None, Some(&mut trace))
                .unwrap();
            let n = trace.len();
            assert_eq!(n, m.cfg.layer_types.len());
            let mut streams = vec![x0];
            streams.extend(trace);
            let ws = WeightStore::open(&dir).unwrap();
            for (k, stream) in streams.iter().enumerate() {
                let mut cache = m.new_cache();
                let x = m.forward_layers(k, stream, &mut cache, None, None).unwrap();
                let logits = m.logits(&m.final_norm(&x).unwrap()).unwrap();
                assert!(
                    bits(&logits) == full,
                    "{model} {prec:?}: resuming at layer {k} differs from the full forward"
                );
                if k < n {
                    // the same layer loaded on its own, run in place of the model's
                    let slot = m.load_layer(&ws, k).unwrap();
                    assert_eq!(slot.index(), k);
                    let mut cache = m.new_cache();
                    let x = m
                        .forward_layers(k, stream, &mut cache, Some(&slot), None)
                        .unwrap();
                    let logits = m.logits(&m.final_norm(&x).unwrap()).unwrap();
                    assert!(
                        bits(&logits) == full,
                        "{model} {prec:?}: a reloaded layer {k} differs"
                    );
                }
            }
            // the head loaded on its own (as the head part does) gives the model's logits
            let head = m.load_head(&ws).unwrap();
            let h = m.final_norm(&streams[n]).unwrap();
            assert!(
                bits(&m.logits_with(&h, &head).unwrap()) == full,
                "{model} {prec:?}: a reloaded head differs"
            );
        }
    }
}

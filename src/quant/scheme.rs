//! Quantization schemes: canonical names (`int8-b32-symclip`, `int8-perchannel-sym`, `kmeans4-g32`, `f16`),
//! per-component mixes (`mlp=int4-b32-symclip,attn=int8-b32-symclip`), the community's aliases
//! (`int8lin`, `int8hu`, `int8hu-headsym`, `int4lin`, `int8`) and bundle-directory names
//! (`qwen3_5_0_8b_decode_int8hu_block32_sym`). A mix may also name one layer's part
//! (`mlp=int4-b32-symclip,mlp@2=int8-b32-symclip`: layer 2's MLP at int8, every other MLP at int4) and the
//! embedding (`embed=…`, left as is unless named) — what `qgate sweep --search` reports.
use crate::error::{Error, Result};
use serde::Serialize;

/// Storage dtype of a float-rounded weight (the control arms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    F16,
    BF16,
}

/// One linear quantizer: `bits`-bit signed integers, blocks of `block` consecutive input features of one
/// output row (`None`: one scale per output row), `clip`: symmetric_with_clipping (range ±qmax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinearSpec {
    pub bits: u8,
    pub block: Option<usize>,
    pub clip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Method {
    Float {
        dtype: FloatDtype,
    },
    Linear(LinearSpec),
    /// Palettization: one `2^bits`-entry LUT per `group` consecutive output rows.
    Kmeans {
        bits: u8,
        group: usize,
    },
}

impl Method {
    pub fn canonical(&self) -> String {
        match self {
            Method::Float {
                dtype: FloatDtype::F16,
            } => "f16".into(),
            Method::Float {
                dtype: FloatDtype::BF16,
            } => "bf16".into(),
            Method::Linear(l) => format!(
                "int{}-{}-{}",
                l.bits,
                match l.block {
                    Some(b) => format!("b{b}"),
                    None => "perchannel".into(),
                },
                if l.clip { "symclip" } else { "sym" }
            ),
            Method::Kmeans { bits, group } => format!("kmeans{bits}-g{group}"),
        }
    }

    /// Parse a canonical method name.
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "f16" | "fp16" | "float16" => {
                return Some(Method::Float {
                    dtype: FloatDtype::F16,
                })
            }
            "bf16" | "bfloat16" => {
                return Some(Method::Float {
                    dtype: FloatDtype::BF16,
                })
            }
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("kmeans") {
            let (b, g) = rest.split_once("-g")?;
            let bits: u8 = b.parse().ok()?;
            let group: usize = g.parse().ok()?;
            return ([8, 6, 4].contains(&bits) && group == 32)
                .then_some(Method::Kmeans { bits, group });
        }
        let rest = s.strip_prefix("int")?;
        let mut parts = rest.split('-');
        let bits: u8 = parts.next()?.parse().ok()?;
        let gran = parts.next()?;
        let sym = parts.next()?;
        if parts.next().is_some() || ![8, 4].contains(&bits) {
            return None;
        }
        let clip = match sym {
            "sym" => false,
            "symclip" => true,
            _ => return None,
        };
        let block = if gran == "perchannel" {
            if bits != 8 {
                return None;
            }
            None
        } else {
            let b: usize = gran.strip_prefix('b')?.parse().ok()?;
            if ![8, 16, 32, 64].contains(&b) {
                return None;
            }
            Some(b)
        };
        Some(Method::Linear(LinearSpec { bits, block, clip }))
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Method::Float { .. })
    }
}

/// Which part of the model a weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Attn,
    Gdn,
    Mlp,
    Head,
    /// The token embedding (`embed_tokens.weight`): quantized only when a scheme names it.
    Embed,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Attn,
        Component::Gdn,
        Component::Mlp,
        Component::Head,
    ];
    pub const BODY: [Component; 3] = [Component::Attn, Component::Gdn, Component::Mlp];
    /// Every component, the embedding included.
    pub const EVERY: [Component; 5] = [
        Component::Attn,
        Component::Gdn,
        Component::Mlp,
        Component::Head,
        Component::Embed,
    ];
    /// Whether the component lives in a decoder layer (so a mix can name one layer's).
    pub fn per_layer(self) -> bool {
        Component::BODY.contains(&self)
    }
    pub fn name(self) -> &'static str {
        match self {
            Component::Attn => "attn",
            Component::Gdn => "gdn",
            Component::Mlp => "mlp",
            Component::Head => "head",
            Component::Embed => "embed",
        }
    }
    pub fn parse(s: &str) -> Option<Component> {
        Component::EVERY.into_iter().find(|c| c.name() == s)
    }
}

/// A full scheme: a method per component (`None`: left as is), and for the float control arms the dtype
/// that every other weight is rounded to as well.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scheme {
    /// The name the user gave (alias, bundle name or canonical spec).
    pub name: String,
    /// The community alias this scheme is known by, if any (`int8hu-headsym`, …).
    pub alias: Option<String>,
    pub attn: Option<Method>,
    pub gdn: Option<Method>,
    pub mlp: Option<Method>,
    pub head: Option<Method>,
    /// Float schemes: every weight (embeddings, norms, …) is stored in this dtype.
    pub rest: Option<FloatDtype>,
    /// The token embedding (`None`: left as is, the default of every alias).
    pub embed: Option<Method>,
    /// One layer's component at another method than its component's (`mlp@2=…`), sorted by (layer,
    /// component).
    pub layers: Vec<LayerOverride>,
}

/// `comp@layer=method` in a mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerOverride {
    pub layer: usize,
    pub component: Component,
    /// `None`: left as is (`keep`).
    pub method: Option<Method>,
}

impl Scheme {
    pub fn method(&self, c: Component) -> Option<Method> {
        match c {
            Component::Attn => self.attn,
            Component::Gdn => self.gdn,
            Component::Mlp => self.mlp,
            Component::Head => self.head,
            Component::Embed => self.embed,
        }
    }
    /// The method of `c` in decoder layer `layer` (`None` for the head and the embedding): a layer
    /// override if the mix names one, else the component's.
    pub fn method_at(&self, c: Component, layer: Option<usize>) -> Option<Method> {
        layer
            .and_then(|l| {
                self.layers
                    .iter()
                    .find(|o| o.layer == l && o.component == c)
            })
            .map(|o| o.method)
            .unwrap_or_else(|| self.method(c))
    }
    /// Set layer `layer`'s `c` to `m` (an override; removed again when it equals the component's).
    pub fn set_at(&mut self, c: Component, layer: usize, m: Option<Method>) {
        self.layers
            .retain(|o| !(o.layer == layer && o.component == c));
        if self.method(c) != m {
            self.layers.push(LayerOverride {
                layer,
                component: c,
                method: m,
            });
            self.layers.sort_by_key(|o| (o.layer, o.component));
        }
    }
    pub fn set(&mut self, c: Component, m: Option<Method>) {
        match c {
            Component::Attn => self.attn = m,
            Component::Gdn => self.gdn = m,
            Component::Mlp => self.mlp = m,
            Component::Head => self.head = m,
            Component::Embed => self.embed = m,
        }
    }

    fn uniform(name: &str, body: Method, head: Option<Method>) -> Scheme {
        Scheme {
            name: name.to_string(),
            alias: None,
            attn: Some(body),
            gdn: Some(body),
            mlp: Some(body),
            head,
            rest: None,
            embed: None,
            layers: Vec::new(),
        }
    }

    /// The exact spec: `attn=…,gdn=…,mlp=…,head=…` (`keep` = left as is).
    pub fn spec(&self) -> String {
        let mut parts: Vec<String> = Component::ALL
            .iter()
            .map(|&c| {
                format!(
                    "{}={}",
                    c.name(),
                    self.method(c)
                        .map(|m| m.canonical())
                        .unwrap_or_else(|| "keep".into())
                )
            })
            .collect();
        if let Some(m) = self.embed {
            parts.push(format!("embed={}", m.canonical()));
        }
        for o in &self.layers {
            parts.push(format!(
                "{}@{}={}",
                o.component.name(),
                o.layer,
                o.method
                    .map(|m| m.canonical())
                    .unwrap_or_else(|| "keep".into())
            ));
        }
        if let Some(r) = self.rest {
            parts.push(format!("rest={}", Method::Float { dtype: r }.canonical()));
        }
        parts.join(",")
    }

    /// The label written into captures and reports: the alias (or the name) and, when it differs, the spec.
    pub fn label(&self) -> String {
        self.alias.clone().unwrap_or_else(|| self.name.clone())
    }

    /// Whether any weight is changed beyond rounding.
    pub fn quantizes(&self) -> bool {
        let q = |m: Option<Method>| m.is_some_and(|m| !m.is_float());
        Component::EVERY.iter().any(|&c| q(self.method(c)))
            || self.layers.iter().any(|o| q(o.method))
    }

    /// Parse a scheme: a canonical name, a component mix, an alias or a bundle-directory name.
    pub fn parse(s: &str) -> Result<Scheme> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        if let Some(m) = Method::parse(&lower) {
            return Ok(match m {
                Method::Float { dtype } => Scheme {
                    rest: Some(dtype),
                    ..Scheme::uniform(t, m, Some(m))
                },
                _ => Scheme::uniform(t, m, None),
            });
        }
        if let Some(sc) = alias(&lower) {
            return Ok(sc);
        }
        if lower.contains('=') {
            return parse_mix(t, &lower);
        }
        let last = lower
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(&lower)
            .to_string();
        if let Some(sc) = from_bundle_name(&last) {
            return Ok(Scheme {
                name: t.to_string(),
                ..sc
            });
        }
        Err(Error::usage(format!(
            "scheme `{t}`: not a canonical scheme (f16, bf16, int{{8,4}}-b{{8,16,32,64}}-{{sym,symclip}}, \
             int8-perchannel-{{sym,symclip}}, kmeans{{8,6,4}}-g32), a component mix \
             (`mlp=int4-b32-symclip,attn=…,gdn=…,head=…,embed=…`, one layer: `mlp@2=…`), an alias ({}) or a bundle name carrying one",
            ALIASES.join(", ")
        )))
    }

    /// Override the head (`--head SCHEME`): a canonical method.
    pub fn with_head(mut self, head: &str) -> Result<Scheme> {
        let m = Method::parse(&head.trim().to_ascii_lowercase()).ok_or_else(|| {
            Error::usage(format!(
                "--head `{head}`: expected a canonical method (f16, int8-b32-sym, int8-perchannel-symclip, kmeans8-g32, …)"
            ))
        })?;
        self.head = Some(m);
        self.name = format!("{}+head={}", self.name, m.canonical());
        self.alias = None;
        Ok(self)
    }
}

pub const ALIASES: [&str; 5] = ["int8lin", "int8hu", "int8hu-headsym", "int4lin", "int8"];

const I8_CLIP: Method = Method::Linear(LinearSpec {
    bits: 8,
    block: Some(32),
    clip: true,
});
const I8_SYM: Method = Method::Linear(LinearSpec {
    bits: 8,
    block: Some(32),
    clip: false,
});
const I4_CLIP: Method = Method::Linear(LinearSpec {
    bits: 4,
    block: Some(32),
    clip: true,
});
const I4_SYM: Method = Method::Linear(LinearSpec {
    bits: 4,
    block: Some(32),
    clip: false,
});
const KM8: Method = Method::Kmeans { bits: 8, group: 32 };

fn alias(a: &str) -> Option<Scheme> {
    let sc = match a {
        "int8lin" => Scheme::uniform(a, I8_CLIP, None),
        "int8hu" => Scheme::uniform(a, I8_CLIP, Some(I8_CLIP)),
        "int8hu-headsym" => Scheme::uniform(a, I8_CLIP, Some(I8_SYM)),
        "int4lin" => Scheme::uniform(a, I4_CLIP, None),
        "int4linsym" => Scheme::uniform(a, I4_SYM, None),
        "int8" => Scheme::uniform(a, KM8, None),
        _ => return None,
    };
    Some(Scheme {
        alias: Some(a.to_string()),
        ..sc
    })
}

/// A bundle directory name: the zoo's precision tag, plus the exporter's `int8hu` head suffix
/// (`_block32_sym` / `_perchan_sym`: a plain-symmetric per-block-32 head, the shipped recipe).
fn from_bundle_name(name: &str) -> Option<Scheme> {
    let tag = crate::gate::bundle::precision_tag(name)?;
    let tag = match tag.as_str() {
        "fp16" | "float16" => "f16",
        "bfloat16" => "bf16",
        t => t,
    };
    if let Some(m @ Method::Float { .. }) = Method::parse(tag) {
        let mut sc = Scheme::uniform(tag, m, Some(m));
        sc.rest = match m {
            Method::Float { dtype } => Some(dtype),
            _ => None,
        };
        sc.alias = Some(tag.to_string());
        return Some(sc);
    }
    if tag == "int8hu" {
        let after = name.split("int8hu").nth(1).unwrap_or("");
        let head_sym = after.split(['_', '-']).any(|p| p == "sym");
        return alias(if head_sym { "int8hu-headsym" } else { "int8hu" });
    }
    alias(tag)
}

fn parse_mix(orig: &str, lower: &str) -> Result<Scheme> {
    let mut sc = Scheme {
        name: orig.to_string(),
        alias: None,
        attn: None,
        gdn: None,
        mlp: None,
        head: None,
        rest: None,
        embed: None,
        layers: Vec::new(),
    };
    let mut seen = Vec::new();
    let mut overrides: Vec<LayerOverride> = Vec::new();
    for part in lower.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            Error::usage(format!("scheme `{orig}`: `{part}` is not COMPONENT=METHOD"))
        })?;
        let m = match v.trim() {
            "keep" => None,
            v => Some(Method::parse(v).ok_or_else(|| {
                Error::usage(format!("scheme `{orig}`: `{v}` is not a canonical method"))
            })?),
        };
        if let Some((c, l)) = k.trim().split_once('@') {
            let comps: Vec<Component> = match c {
                "body" => Component::BODY.to_vec(),
                c => match Component::parse(c) {
                    Some(c) if c.per_layer() => vec![c],
                    _ => {
                        return Err(Error::usage(format!(
                        "scheme `{orig}`: `{c}@{l}`: only attn, gdn, mlp or body can name a layer"
                    )))
                    }
                },
            };
            let layer: usize = l.parse().map_err(|_| {
                Error::usage(format!(
                    "scheme `{orig}`: `{c}@{l}`: the layer is not a number"
                ))
            })?;
            for component in comps {
                if overrides
                    .iter()
                    .any(|o| o.layer == layer && o.component == component)
                {
                    return Err(Error::usage(format!(
                        "scheme `{orig}`: `{}@{layer}` given twice",
                        component.name()
                    )));
                }
                overrides.push(LayerOverride {
                    layer,
                    component,
                    method: m,
                });
            }
            continue;
        }
        let comps: Vec<Component> = match k.trim() {
            "body" => Component::BODY.to_vec(),
            k => vec![Component::parse(k).ok_or_else(|| {
                Error::usage(format!(
                    "scheme `{orig}`: unknown component `{k}` (attn, gdn, mlp, head, embed, body)"
                ))
            })?],
        };
        for c in comps {
            if seen.contains(&c) {
                return Err(Error::usage(format!(
                    "scheme `{orig}`: component `{}` given twice",
                    c.name()
                )));
            }
            seen.push(c);
            sc.set(c, m);
        }
    }
    for o in overrides {
        sc.set_at(o.component, o.layer, o.method);
    }
    Ok(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_round_trip() {
        for n in [
            "f16",
            "bf16",
            "int8-b32-symclip",
            "int4-b16-sym",
            "int8-b64-sym",
            "int8-b8-symclip",
            "int8-perchannel-sym",
            "int8-perchannel-symclip",
            "kmeans8-g32",
            "kmeans6-g32",
            "kmeans4-g32",
        ] {
            assert_eq!(Method::parse(n).map(|m| m.canonical()).as_deref(), Some(n));
        }
        for bad in [
            "int4-perchannel-sym",
            "int8-b33-sym",
            "int2-b32-sym",
            "kmeans8-g16",
            "int8-b32",
        ] {
            assert_eq!(Method::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn aliases_and_bundle_names() {
        let s = Scheme::parse("int8hu-headsym").unwrap();
        assert_eq!(
            s.spec(),
            "attn=int8-b32-symclip,gdn=int8-b32-symclip,mlp=int8-b32-symclip,head=int8-b32-sym"
        );
        assert_eq!(
            Scheme::parse("int8lin").unwrap().spec(),
            "attn=int8-b32-symclip,gdn=int8-b32-symclip,mlp=int8-b32-symclip,head=keep"
        );
        assert_eq!(
            Scheme::parse("int8").unwrap().spec(),
            "attn=kmeans8-g32,gdn=kmeans8-g32,mlp=kmeans8-g32,head=keep"
        );
        assert_eq!(
            Scheme::parse("int4lin").unwrap().spec(),
            "attn=int4-b32-symclip,gdn=int4-b32-symclip,mlp=int4-b32-symclip,head=keep"
        );
        let b = Scheme::parse("/x/qwen3_5_0_8b_decode_int8hu_block32_sym/").unwrap();
        assert_eq!(b.alias.as_deref(), Some("int8hu-headsym"));
        let b = Scheme::parse("qwen3_5_0_8b_decode_int8hu_perchan_sym").unwrap();
        assert_eq!(b.alias.as_deref(), Some("int8hu-headsym"));
        let b = Scheme::parse("qwen3_5_0_8b_decode_int8hu").unwrap();
        assert_eq!(b.alias.as_deref(), Some("int8hu"));
        let b = Scheme::parse("qwen3_5_0_8b_decode_int8lin_l2").unwrap();
        assert_eq!(b.alias.as_deref(), Some("int8lin"));
        let b = Scheme::parse("qwen3_5_0_8b_decode_fp16").unwrap();
        assert_eq!(b.spec(), "attn=f16,gdn=f16,mlp=f16,head=f16,rest=f16");
        assert!(Scheme::parse("qwen3_5_0_8b_decode_mixed48").is_err());
    }

    #[test]
    fn mixes_and_head_override() {
        let s = Scheme::parse("mlp=int4-b32-symclip,attn=int8-b32-symclip,gdn=int8-b32-symclip")
            .unwrap();
        assert_eq!(
            s.spec(),
            "attn=int8-b32-symclip,gdn=int8-b32-symclip,mlp=int4-b32-symclip,head=keep"
        );
        let s = Scheme::parse("body=int8-b32-symclip,mlp=int4-b32-sym").unwrap_err();
        assert!(s.to_string().contains("twice"), "{s}");
        let s = Scheme::parse("int8lin")
            .unwrap()
            .with_head("int8-b32-sym")
            .unwrap();
        assert_eq!(
            s.head.map(|m| m.canonical()).as_deref(),
            Some("int8-b32-sym")
        );
        assert!(Scheme::parse("attn=int3").is_err());
        // one layer's part, and the embedding
        let s = Scheme::parse(
            "body=int4-b32-symclip,mlp@2=int8-b32-symclip,attn@1=keep,embed=int8-b32-sym",
        )
        .unwrap();
        assert_eq!(
            s.spec(),
            "attn=int4-b32-symclip,gdn=int4-b32-symclip,mlp=int4-b32-symclip,head=keep,embed=int8-b32-sym,attn@1=keep,mlp@2=int8-b32-symclip"
        );
        assert_eq!(Scheme::parse(&s.spec()).unwrap().spec(), s.spec());
        assert_eq!(
            s.method_at(Component::Mlp, Some(2)).map(|m| m.canonical()),
            Some("int8-b32-symclip".into())
        );
        assert_eq!(
            s.method_at(Component::Mlp, Some(3)).map(|m| m.canonical()),
            Some("int4-b32-symclip".into())
        );
        assert_eq!(s.method_at(Component::Attn, Some(1)), None);
        // an override equal to its component's method is no override
        let s = Scheme::parse("mlp=int4-b32-symclip,mlp@0=int4-b32-symclip").unwrap();
        assert!(s.layers.is_empty());
        for bad in [
            "head@1=int8-b32-sym",
            "mlp@x=int8-b32-sym",
            "mlp@1=int8-b32-sym,mlp@1=keep",
        ] {
            assert!(Scheme::parse(bad).is_err(), "{bad}");
        }
        assert!(Scheme::parse("nonsense").is_err());
    }
}

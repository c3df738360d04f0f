//! Token ids to readable text, when a tokenizer is available (else the id). Ids are always inside a code
//! span (`` `#335` ``), so GitHub and the Hugging Face hub do not turn them into issue links.
use std::path::Path;

pub struct TokenText {
    tok: Option<tokenizers::Tokenizer>,
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        match ch {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '|' => out.push_str("\\|"),
            '`' => out.push('\''),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl TokenText {
    pub fn none() -> Self {
        TokenText { tok: None }
    }
    /// Load `tokenizer.json`; a tokenizer that fails to load is a usage problem the caller reports.
    pub fn load(path: &Path) -> Result<Self, String> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| TokenText { tok: Some(t) })
            .map_err(|e| e.to_string())
    }
    pub fn available(&self) -> bool {
        self.tok.is_some()
    }
    fn decode(&self, ids: &[i64]) -> Option<String> {
        let t = self.tok.as_ref()?;
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        t.decode(&ids, false).ok()
    }
    /// One token: `` `text` `#id` `` or `` `#id` ``.
    pub fn token(&self, id: usize) -> String {
        match self.decode(&[id as i64]) {
            Some(s) => format!("`{}` `#{id}`", escape(&s)),
            None => format!("`#{id}`"),
        }
    }
    /// The last few tokens up to and including `pos` (the context the prediction follows).
    pub fn context(&self, tokens: &[i64], pos: usize) -> String {
        let end = (pos + 1).min(tokens.len());
        let start = end.saturating_sub(8);
        match self.decode(&tokens[start..end]) {
            Some(s) => format!("…{}", escape(&s)),
            None => format!(
                "`…{}`",
                tokens[start..end]
                    .iter()
                    .map(|t| format!("#{t}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

//! Host paths out of what clients read. A load failure's reason, an Ollama modelfile or an LM Studio
//! model record would otherwise tell any client where the operator keeps files; only a key with
//! the `models` scope (the operator's own) sees them whole. The logs always have them.

/// `text` with every absolute path cut to its last component (`/home/me/models/x.gguf` →
/// `…/x.gguf`). A path starts at a `/` at the start or after a space, quote, bracket or `=`, and
/// runs to whitespace, a quote, a bracket, a comma or a `:` followed by a space.
pub fn paths(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let starts = bytes[i] == b'/'
            && (i == 0 || b" \t\n\"'([{=`".contains(&bytes[i - 1]))
            && bytes.get(i + 1).is_some_and(|b| !b.is_ascii_whitespace());
        if !starts {
            let c = text[i..].chars().next().expect("at a char boundary");
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        let mut end = i;
        while end < bytes.len() {
            let b = bytes[end];
            let colon_space = b == b':' && bytes.get(end + 1).is_none_or(|n| *n == b' ');
            if b.is_ascii_whitespace() || b"\"'`)]},".contains(&b) || colon_space {
                break;
            }
            end += 1;
        }
        let path = &text[i..end];
        let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        out.push('…');
        out.push('/');
        out.push_str(last);
        i = end;
    }
    out
}

/// The file name of `path`, as a client without the `models` scope sees it.
pub fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_keep_only_their_file() {
        assert_eq!(
            paths("cannot read /home/me/models/x.gguf: permission denied"),
            "cannot read …/x.gguf: permission denied"
        );
        assert_eq!(
            paths("file \"/srv/ollama/blobs/sha256-ab\" is truncated"),
            "file \"…/sha256-ab\" is truncated"
        );
        assert_eq!(paths("FROM /a/b/c.gguf\n"), "FROM …/c.gguf\n");
        assert_eq!(paths("(path=/x/y, ok)"), "(path=…/y, ok)");
        // Not paths: ratios, URLs, a lone slash, words with slashes inside.
        for text in [
            "1/2 layers",
            "http://127.0.0.1:8080/v1",
            "a / b",
            "and/or",
            "Ü/ß",
        ] {
            assert_eq!(paths(text), text);
        }
    }
}

//! The request body of the HTTP contract: [`render_body`] turns a committed transaction
//! into the JSON the app receives, keys and headers lossless (base64 where not UTF-8).

use base64::Engine as _;
use serde_json::value::RawValue;

use crate::config::HeaderNames;
use crate::dlq::DLQ_HEADER_PREFIX;

use super::ReadyTxn;

/// Renders the request body of the brief's HTTP contract.
///
/// Only marker fields must be text: a task's key and headers are data and reach the app
/// losslessly (base64 where they are not UTF-8, flagged by the `*_encoding` fields and
/// `base64_headers`). Marker headers and `txn-dlq-*` headers are not rendered.
///
/// The body is `{"id", "topic", "partition", "commit_offset", "tasks": [...]}`, and a
/// task is `{"offset", "key", "key_encoding"?, "headers", "base64_headers"?,
/// "header_list"?, "value", "encoding"?}`, the `?` fields only when they apply.
///
/// Size: about the transaction's staged bytes plus 100 bytes per task for JSON values and
/// text without escapes; base64 adds a third; escaped text up to 2× (quotes, backslashes)
/// and 6× (control characters, as `\u00xx`). The buffer is held at the body's length.
///
/// Written by hand into one buffer, byte for byte what `serde_json` wrote from derived
/// structs before (a property test compares the two). The serde renderer escaped each
/// field name at run time, wrote every fragment through `io::Write` and allocated per task:
/// for 10 tasks of 100-byte JSON values (callgrind, delivery benchmark) it took 37 100
/// instructions per transaction, this one 22 600, about half of them `serde_json`
/// validating the values (docs/benchmarks-history.md, change 13).
pub fn render_body(txn: &ReadyTxn, names: &HeaderNames) -> Vec<u8> {
    let marker_headers = [
        names.id.as_bytes(),
        names.kind.as_bytes(),
        names.count.as_bytes(),
    ];
    // Whether a header reaches the app at all.
    let rendered = |name: &[u8]| {
        !name.starts_with(DLQ_HEADER_PREFIX.as_bytes()) && !marker_headers.contains(&name)
    };
    // Sized for the staged bytes plus the JSON around them, so the body is written
    // without the reallocations and copies of a growing `Vec`.
    let estimate = txn.tasks.encoded_len() + 96 * txn.tasks.len() + 128;
    let mut out = Vec::with_capacity(estimate);
    out.extend_from_slice(b"{\"id\":");
    write_str(&mut out, &txn.id);
    out.extend_from_slice(b",\"topic\":");
    write_str(&mut out, &txn.topic);
    out.extend_from_slice(b",\"partition\":");
    write_int(&mut out, txn.partition.into());
    out.extend_from_slice(b",\"commit_offset\":");
    write_int(&mut out, txn.commit_offset);
    out.extend_from_slice(b",\"tasks\":[");
    // The entries of a task's `headers` object, one buffer for every task: most tasks
    // carry only the marker headers, so it rarely allocates at all.
    let mut headers: Vec<(&str, Option<Text<'_>>)> = Vec::new();
    write_seq(&mut out, txn.tasks.iter(), |out, t| {
        let (key, value, all_headers) = t.parts();
        out.extend_from_slice(b"{\"offset\":");
        write_int(out, t.offset);
        out.extend_from_slice(b",\"key\":");
        let key = key.map(Text::of);
        write_opt_text(out, key);
        if key.is_some_and(Text::is_base64) {
            out.extend_from_slice(b",\"key_encoding\":\"base64\"");
        }

        headers.clear();
        let mut binary_name = false;
        for (k, v) in all_headers.filter(|(k, _)| rendered(k)) {
            match std::str::from_utf8(k) {
                Ok(k) => headers.push((k, v.map(Text::of))),
                Err(_) => binary_name = true,
            }
        }
        // Stable sort, then keep the last of each name: what a JSON object built by
        // inserting in record order would hold. (`dedup_by` removes the later of two
        // equal neighbours, so the kept one takes its value.)
        let rendered_count = headers.len();
        headers.sort_by(|a, b| a.0.cmp(b.0));
        headers.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
        let repeated_name = headers.len() != rendered_count;
        out.extend_from_slice(b",\"headers\":{");
        write_seq(out, headers.iter(), |out, &(k, v)| {
            write_str(out, k);
            out.push(b':');
            write_opt_text(out, v);
        });
        out.push(b'}');
        // Names in `headers` whose value is base64 because it is not UTF-8.
        let mut base64_names = headers
            .iter()
            .filter(|(_, v)| v.is_some_and(Text::is_base64))
            .peekable();
        if base64_names.peek().is_some() {
            out.extend_from_slice(b",\"base64_headers\":[");
            write_seq(out, base64_names, |out, (k, _)| write_str(out, k));
            out.push(b']');
        }
        // The object lost a header: list them all, in record order (a second walk of
        // the layout, only on this rare path).
        if repeated_name || binary_name {
            out.extend_from_slice(b",\"header_list\":[");
            write_seq(
                out,
                t.headers().filter(|(k, _)| rendered(k)),
                |out, (k, v)| {
                    let (name, value) = (Text::of(k), v.map(Text::of));
                    out.extend_from_slice(b"{\"name\":");
                    name.write(out);
                    out.extend_from_slice(b",\"value\":");
                    write_opt_text(out, value);
                    if name.is_base64() {
                        out.extend_from_slice(b",\"name_encoding\":\"base64\"");
                    }
                    if value.is_some_and(Text::is_base64) {
                        out.extend_from_slice(b",\"value_encoding\":\"base64\"");
                    }
                    out.push(b'}');
                },
            );
            out.push(b']');
        }

        out.extend_from_slice(b",\"value\":");
        match value {
            None => out.extend_from_slice(b"null"),
            // One valid JSON value is embedded as `RawValue` has it: the whitespace
            // around it dropped, everything inside byte for byte.
            Some(v) => match serde_json::from_slice::<&RawValue>(v) {
                Ok(raw) => out.extend_from_slice(raw.get().as_bytes()),
                Err(_) => {
                    let text = Text::of(v);
                    text.write(out);
                    if text.is_base64() {
                        out.extend_from_slice(b",\"encoding\":\"base64\"");
                    }
                }
            },
        }
        out.push(b'}');
    });
    out.extend_from_slice(b"]}");
    // Escaped text can outgrow the estimate several times over, and `Vec` doubles: the
    // body is held for every retry, so it is held at its length, not at twice that.
    if out.capacity() > estimate {
        out.shrink_to_fit();
    }
    out
}

/// Record bytes as a JSON string: the text itself when it is UTF-8, else its base64.
#[derive(Clone, Copy)]
enum Text<'a> {
    Utf8(&'a str),
    Base64(&'a [u8]),
}

impl<'a> Text<'a> {
    fn of(b: &'a [u8]) -> Text<'a> {
        match std::str::from_utf8(b) {
            Ok(s) => Text::Utf8(s),
            Err(_) => Text::Base64(b),
        }
    }

    fn is_base64(self) -> bool {
        matches!(self, Text::Base64(_))
    }

    fn write(self, out: &mut Vec<u8>) {
        match self {
            Text::Utf8(s) => write_str(out, s),
            Text::Base64(b) => {
                out.push(b'"');
                let start = out.len();
                // Encoded in place, without a `String` of its own. The room is exactly
                // the padded encoding, so the encoding cannot fail.
                let room = b.len().div_ceil(3) * 4;
                out.resize(start + room, 0);
                let n =
                    base64::engine::general_purpose::STANDARD.encode_slice(b, &mut out[start..]);
                debug_assert_eq!(n.as_ref().ok(), Some(&room));
                out.truncate(start + n.unwrap_or(0));
                out.push(b'"');
            }
        }
    }
}

/// `null` for `None`.
fn write_opt_text(out: &mut Vec<u8>, t: Option<Text<'_>>) {
    match t {
        Some(t) => t.write(out),
        None => out.extend_from_slice(b"null"),
    }
}

/// `items` separated by commas, each written by `write`.
fn write_seq<T>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = T>,
    mut write: impl FnMut(&mut Vec<u8>, T),
) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
}

/// `s` as a JSON string, escaped as `serde_json` escapes: `"`, `\` and the control
/// characters below 0x20 only (not `/`, DEL or non-ASCII), short forms where JSON has
/// them, else `\u00xx` in lowercase hex.
fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let s = s.as_bytes();
    out.push(b'"');
    // Most strings need no escape: a scan without early exit, which the compiler can
    // vectorise, then one copy; the byte loop alone cost nearly twice as much for
    // 10-byte keys.
    let escape = s
        .iter()
        .fold(false, |e, &c| e | (c < 0x20) | (c == b'"') | (c == b'\\'));
    let mut run = 0; // start of the bytes not yet written
    if escape {
        for (i, &c) in s.iter().enumerate() {
            let short = match c {
                b'"' => b'"',
                b'\\' => b'\\',
                0x08 => b'b',
                b'\t' => b't',
                b'\n' => b'n',
                0x0c => b'f',
                b'\r' => b'r',
                0..0x20 => b'u',
                _ => continue,
            };
            out.extend_from_slice(&s[run..i]);
            run = i + 1;
            if short == b'u' {
                let (hi, lo) = (HEX[usize::from(c >> 4)], HEX[usize::from(c & 0xf)]);
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hi, lo]);
            } else {
                out.extend_from_slice(&[b'\\', short]);
            }
        }
    }
    out.extend_from_slice(&s[run..]);
    out.push(b'"');
}

/// `n` in decimal, by `itoa` through `serde_json`'s formatter, as before (a digit loop
/// here cost a third more); writing to a `Vec` cannot fail.
fn write_int(out: &mut Vec<u8>, n: i64) {
    use serde_json::ser::Formatter as _;
    let _ = serde_json::ser::CompactFormatter.write_i64(out, n);
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::delivery::testing::task;
    use crate::protocol::{Record, Records};

    /// The serde renderer that `render_body` replaced, kept as the
    /// reference for its bytes.
    mod serde_reference {
        use base64::Engine as _;
        use serde::Serialize;
        use serde_json::value::RawValue;

        use crate::config::HeaderNames;
        use crate::delivery::ReadyTxn;
        use crate::dlq::DLQ_HEADER_PREFIX;

        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            topic: &'a str,
            partition: i32,
            commit_offset: i64,
            tasks: Vec<TaskBody<'a>>,
        }

        #[derive(Serialize)]
        struct TaskBody<'a> {
            offset: i64,
            key: Option<Text<'a>>,
            /// `"base64"` when the key is not UTF-8.
            #[serde(skip_serializing_if = "Option::is_none")]
            key_encoding: Option<&'static str>,
            headers: TaskHeaders<'a>,
            /// Names in `headers` whose value is base64 because it is not UTF-8.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            base64_headers: Vec<&'a str>,
            /// Every rendered header in record order, only when `headers` loses some: a repeated
            /// name, or a name that is not UTF-8.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            header_list: Vec<ListedHeader<'a>>,
            value: TaskValue<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            encoding: Option<&'static str>,
        }

        /// Record bytes as a JSON string: the text itself when it is UTF-8, else its base64.
        ///
        /// Base64 is written straight into the body by `collect_str`, without a `String`.
        #[derive(Clone, Copy)]
        enum Text<'a> {
            Utf8(&'a str),
            Base64(&'a [u8]),
        }

        impl<'a> Text<'a> {
            fn of(b: &'a [u8]) -> Text<'a> {
                match std::str::from_utf8(b) {
                    Ok(s) => Text::Utf8(s),
                    Err(_) => Text::Base64(b),
                }
            }

            fn is_base64(&self) -> bool {
                matches!(self, Text::Base64(_))
            }

            /// The `*_encoding` field that goes with it.
            fn encoding(&self) -> Option<&'static str> {
                self.is_base64().then_some("base64")
            }
        }

        impl Serialize for Text<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    Text::Utf8(t) => s.serialize_str(t),
                    Text::Base64(b) => s.collect_str(&base64::display::Base64Display::new(
                        b,
                        &base64::engine::general_purpose::STANDARD,
                    )),
                }
            }
        }

        /// A task's headers as a JSON object: sorted by name, the last of a repeated name wins;
        /// names that are not UTF-8 are left out (they are in `header_list`).
        ///
        /// Borrowed from the staged record, so rendering allocates one small `Vec` per task
        /// instead of a map node and two `String`s per header (docs/benchmarks-history.md, "Delivery").
        struct TaskHeaders<'a>(Vec<(&'a str, Option<Text<'a>>)>);

        impl Serialize for TaskHeaders<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in &self.0 {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }

        /// One entry of `header_list`.
        #[derive(Serialize)]
        struct ListedHeader<'a> {
            name: Text<'a>,
            value: Option<Text<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            name_encoding: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            value_encoding: Option<&'static str>,
        }

        #[derive(Serialize)]
        #[serde(untagged)]
        enum TaskValue<'a> {
            Json(&'a RawValue),
            Text(&'a str),
            Base64(String),
            Null,
        }

        /// The body as `serde_json` wrote it from these structs before `render_body` was
        /// written by hand: the reference it must match byte for byte.
        pub(super) fn render_body_serde(txn: &ReadyTxn, names: &HeaderNames) -> Vec<u8> {
            let marker_headers = [names.id.as_str(), names.kind.as_str(), names.count.as_str()];
            // Whether a header reaches the app at all.
            let rendered = |name: &[u8]| {
                !name.starts_with(DLQ_HEADER_PREFIX.as_bytes())
                    && !marker_headers.iter().any(|m| m.as_bytes() == name)
            };
            let tasks: Vec<TaskBody<'_>> = txn
                .tasks
                .iter()
                .map(|t| {
                    let (key, value, all_headers) = t.parts();
                    // Most tasks carry only the marker headers: allocate only for others.
                    let mut headers: Vec<(&str, Option<Text<'_>>)> = Vec::new();
                    let mut binary_name = false;
                    for (k, v) in all_headers {
                        if !rendered(k) {
                            continue;
                        }
                        let Ok(k) = std::str::from_utf8(k) else {
                            binary_name = true;
                            continue;
                        };
                        headers.push((k, v.map(Text::of)));
                    }
                    // Stable sort, then keep the last of each name: what a JSON object built by
                    // inserting in record order would hold.
                    let rendered_count = headers.len();
                    headers.sort_by(|a, b| a.0.cmp(b.0));
                    headers.reverse();
                    headers.dedup_by(|later, kept| later.0 == kept.0);
                    headers.reverse();
                    let repeated_name = headers.len() != rendered_count;
                    // Collecting nothing allocates nothing.
                    let base64_headers: Vec<&str> = headers
                        .iter()
                        .filter(|(_, v)| v.is_some_and(|v| v.is_base64()))
                        .map(|(k, _)| *k)
                        .collect();
                    // The object lost a header: list them all, in record order (a second walk of
                    // the layout, only on this rare path).
                    let header_list: Vec<ListedHeader<'_>> = if repeated_name || binary_name {
                        t.headers()
                            .filter(|(k, _)| rendered(k))
                            .map(|(k, v)| {
                                let (name, value) = (Text::of(k), v.map(Text::of));
                                ListedHeader {
                                    name,
                                    value,
                                    name_encoding: name.encoding(),
                                    value_encoding: value.and_then(|v| v.encoding()),
                                }
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let key = key.map(Text::of);
                    let (value, encoding) = match value {
                        None => (TaskValue::Null, None),
                        Some(v) => match serde_json::from_slice::<&RawValue>(v) {
                            Ok(raw) => (TaskValue::Json(raw), None),
                            Err(_) => match std::str::from_utf8(v) {
                                Ok(s) => (TaskValue::Text(s), None),
                                Err(_) => (
                                    TaskValue::Base64(
                                        base64::engine::general_purpose::STANDARD.encode(v),
                                    ),
                                    Some("base64"),
                                ),
                            },
                        },
                    };
                    TaskBody {
                        offset: t.offset,
                        key,
                        key_encoding: key.and_then(|k| k.encoding()),
                        headers: TaskHeaders(headers),
                        base64_headers,
                        header_list,
                        value,
                        encoding,
                    }
                })
                .collect();
            let body = Body {
                id: &txn.id,
                topic: &txn.topic,
                partition: txn.partition,
                commit_offset: txn.commit_offset,
                tasks,
            };
            // Sized for the staged bytes plus the JSON around them, so the body is written
            // without the reallocations and copies of a growing `Vec`.
            let mut out = Vec::with_capacity(txn.tasks.encoded_len() + 96 * txn.tasks.len() + 128);
            match serde_json::to_writer(&mut out, &body) {
                Ok(()) => out,
                Err(_) => Vec::new(),
            }
        }
    }

    fn names() -> HeaderNames {
        HeaderNames {
            id: "txn-id".into(),
            kind: "txn-type".into(),
            count: "txn-count".into(),
        }
    }

    #[test]
    fn body_follows_the_contract() {
        let txn = ReadyTxn {
            topic: "orders.tx".into(),
            partition: 3,
            id: "order-42".into(),
            commit_offset: 1207,
            first_offset: 1201,
            tasks: vec![
                task(1201, br#"{"any": "json"}"#),
                task(1202, b"plain text"),
                task(1203, &[0xff, 0x00]),
            ]
            .into_iter()
            .collect(),
            marker: task(1207, b""),
            committed_at: Instant::now(),
        };
        let v: serde_json::Value = serde_json::from_slice(&render_body(&txn, &names())).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "order-42", "topic": "orders.tx", "partition": 3, "commit_offset": 1207,
                "tasks": [
                    {"offset": 1201, "key": "order-42", "headers": {"h": "v"}, "value": {"any": "json"}},
                    {"offset": 1202, "key": "order-42", "headers": {"h": "v"}, "value": "plain text"},
                    {"offset": 1203, "key": "order-42", "headers": {"h": "v"}, "value": "/wA=", "encoding": "base64"},
                ]
            })
        );
        assert_eq!(txn.idempotency_key(), "orders.tx/3/1207");
    }

    /// The body of a one-task transaction holding `rec`, as text (every byte of it is
    /// ASCII or UTF-8 text: base64 never leaves raw bytes in the JSON).
    fn render_one(rec: Record) -> String {
        let txn = ReadyTxn {
            topic: "t".into(),
            partition: 0,
            id: "x".into(),
            commit_offset: 9,
            first_offset: 8,
            tasks: Records::from(rec),
            marker: task(9, b""),
            committed_at: Instant::now(),
        };
        String::from_utf8(render_body(&txn, &names())).unwrap()
    }

    /// The JSON of a one-task body around the task's fields `task`.
    fn one_task_body(task: &str) -> String {
        format!(
            r#"{{"id":"x","topic":"t","partition":0,"commit_offset":9,"tasks":[{{"offset":8,{task}}}]}}"#
        )
    }

    #[test]
    fn task_headers_are_sorted_deduplicated_last_wins_and_escaped() {
        let h: [(&[u8], Option<&[u8]>); 7] = [
            (b"zeta", Some(b"1")),
            (b"txn-type", Some(b"task")),
            (b"alpha", Some(b"first")),
            (b"nul", None),
            (b"alpha", Some(b"second \"quoted\"")),
            (b"txn-id", Some(b"x")),
            (b"\xff", Some(b"name not utf-8")),
        ];
        // The repeated name and the binary name put every rendered header in
        // `header_list` too, in record order.
        assert_eq!(
            render_one(Record::new(8, Some(5), None, None, &h)),
            one_task_body(concat!(
                r#""key":null,"headers":{"alpha":"second \"quoted\"","nul":null,"zeta":"1"},"#,
                r#""header_list":[{"name":"zeta","value":"1"},{"name":"alpha","value":"first"},"#,
                r#"{"name":"nul","value":null},{"name":"alpha","value":"second \"quoted\""},"#,
                r#"{"name":"/w==","value":"name not utf-8","name_encoding":"base64"}],"#,
                r#""value":null"#
            ))
        );
    }

    #[test]
    fn all_text_tasks_render_byte_identical_to_before() {
        // Text keys and headers, unique names: the bytes the renderer wrote before keys
        // and headers were kept lossless (checked against that renderer), no new field.
        let h: [(&[u8], Option<&[u8]>); 6] = [
            (b"txn-id", Some(b"order-42")),
            (b"txn-type", Some(b"task")),
            (b"z", Some(b"\"q\"\n")),
            (b"a", Some("é".as_bytes())),
            (b"txn-count", Some(b"3")),
            (b"m", None),
        ];
        let tasks: Records = vec![
            Record::new(
                1201,
                Some(1),
                Some(b"order-42"),
                Some(br#"{"any": "json"}"#),
                &h,
            ),
            Record::new(
                1202,
                None,
                Some("ключ".as_bytes()),
                Some(b"plain text"),
                &h[..2],
            ),
            Record::new(1203, None, None, Some(&[0xff, 0x00]), &[]),
            Record::new(1204, None, Some(b""), None, &h[4..]),
        ]
        .into_iter()
        .collect();
        let txn = ReadyTxn {
            topic: "orders.tx".into(),
            partition: 3,
            id: "order-42".into(),
            commit_offset: 1207,
            first_offset: 1201,
            tasks,
            marker: task(1207, b""),
            committed_at: Instant::now(),
        };
        assert_eq!(
            String::from_utf8(render_body(&txn, &names())).unwrap(),
            concat!(
                r#"{"id":"order-42","topic":"orders.tx","partition":3,"commit_offset":1207,"tasks":["#,
                r#"{"offset":1201,"key":"order-42","headers":{"a":"é","m":null,"z":"\"q\"\n"},"value":{"any": "json"}},"#,
                r#"{"offset":1202,"key":"ключ","headers":{},"value":"plain text"},"#,
                r#"{"offset":1203,"key":null,"headers":{},"value":"/wA=","encoding":"base64"},"#,
                r#"{"offset":1204,"key":"","headers":{"m":null},"value":null}]}"#
            )
        );
    }

    #[test]
    fn a_binary_key_is_base64_with_key_encoding() {
        let h: [(&[u8], Option<&[u8]>); 1] = [(b"txn-type", Some(b"task"))];
        assert_eq!(
            render_one(Record::new(
                8,
                None,
                Some(&[0xa1, 0x03, 0xff]),
                Some(b"1"),
                &h
            )),
            one_task_body(r#""key":"oQP/","key_encoding":"base64","headers":{},"value":1"#)
        );
    }

    #[test]
    fn a_binary_header_value_is_base64_and_named_in_base64_headers() {
        let h: [(&[u8], Option<&[u8]>); 4] = [
            (b"txn-type", Some(b"task")),
            (b"sig", Some(&[0xa1, 0x03, 0x61, 0x62, 0x63])),
            (b"ct", Some(b"text/plain")),
            (b"blob", Some(&[0x80])),
        ];
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(concat!(
                r#""key":"k","headers":{"blob":"gA==","ct":"text/plain","sig":"oQNhYmM="},"#,
                r#""base64_headers":["blob","sig"],"value":1"#
            ))
        );
    }

    #[test]
    fn repeated_header_names_add_a_header_list_in_record_order() {
        let h: [(&[u8], Option<&[u8]>); 5] = [
            (b"b", Some(&[0xa1, 0x03, 0x61, 0x62, 0x63])),
            (b"txn-id", Some(b"x")),
            (b"a", Some(b"1")),
            (b"b", Some(b"text")),
            (b"a", None),
        ];
        // The object keeps the last of each name, so `b` is text there and not in
        // `base64_headers`; the list keeps the binary value it lost.
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(concat!(
                r#""key":"k","headers":{"a":null,"b":"text"},"header_list":["#,
                r#"{"name":"b","value":"oQNhYmM=","value_encoding":"base64"},"#,
                r#"{"name":"a","value":"1"},{"name":"b","value":"text"},"#,
                r#"{"name":"a","value":null}],"value":1"#
            ))
        );
    }

    #[test]
    fn a_header_name_that_is_not_utf8_is_only_in_header_list() {
        let h: [(&[u8], Option<&[u8]>); 3] = [
            (b"txn-type", Some(b"task")),
            (b"ok", Some(b"1")),
            (&[0xc3, 0x28], Some(&[0xfe])),
        ];
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(concat!(
                r#""key":"k","headers":{"ok":"1"},"header_list":[{"name":"ok","value":"1"},"#,
                r#"{"name":"wyg=","value":"/g==","name_encoding":"base64","value_encoding":"base64"}],"#,
                r#""value":1"#
            ))
        );
    }

    #[test]
    fn dead_letter_headers_of_a_replayed_dead_letter_are_not_rendered() {
        let h: [(&[u8], Option<&[u8]>); 7] = [
            (b"txn-dlq-reason", Some(b"rejected")),
            (b"txn-type", Some(b"task")),
            (b"x", Some(b"1")),
            (b"txn-dlq-source", Some(b"orders.tx/0/2")),
            (b"txn-dlq-reason", Some(b"expired")),
            (b"txn-dlq-\xff", Some(b"not utf-8 either")),
            (b"txn-dlq-timestamp", Some(b"1700000000000")),
        ];
        // Not even in a `header_list`: repeated or binary `txn-dlq-*` names do not make one.
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(r#""key":"k","headers":{"x":"1"},"value":1"#)
        );
    }

    /// Bytes a producer might send: runs of single bytes (any, so also invalid UTF-8),
    /// JSON's special characters, control characters, multi-byte UTF-8 and escapes.
    fn hostile_bytes(max_atoms: usize) -> impl Strategy<Value = Vec<u8>> {
        let atom = prop_oneof![
            any::<u8>().prop_map(|b| vec![b]),
            prop::sample::select(vec![
                &b"\""[..],
                b"\\",
                b"/",
                b"\0",
                b"\x01",
                b"\x08",
                b"\t",
                b"\n",
                b"\x0b",
                b"\x0c",
                b"\r",
                b"\x1b",
                b"\x1f",
                b" ",
                b"\x7f",
                b"a",
                b"Z",
                b"0",
                b"{",
                b"}",
                b"[",
                b":",
                b",",
                "é".as_bytes(),
                "€".as_bytes(),
                "😀".as_bytes(),
                "\u{2028}".as_bytes(),
                "\u{feff}".as_bytes(),
                b"\\u00e9",
                b"\\ud800",
                b"\\n",
                // Truncated, overlong, surrogate and out-of-range UTF-8.
                b"\xc3",
                b"\xc0\xaf",
                b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80",
                b"\xff",
                b"\x80",
            ])
            .prop_map(<[u8]>::to_vec),
        ];
        prop::collection::vec(atom, 0..max_atoms).prop_map(|v| v.concat())
    }

    /// JSON whitespace, as may surround a value.
    fn json_ws() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec![" ", "\t", "\n", "\r"]), 0..3)
            .prop_map(|v| v.concat())
    }

    /// One valid JSON value as text, compact or pretty, maybe inside whitespace.
    fn json_text() -> impl Strategy<Value = Vec<u8>> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from), // NaN and infinities become null
            ".{0,12}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((".{0,6}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        });
        (json_ws(), value, any::<bool>(), json_ws()).prop_map(|(pre, v, pretty, post)| {
            let v = if pretty {
                serde_json::to_string_pretty(&v)
            } else {
                serde_json::to_string(&v)
            };
            format!("{pre}{}{post}", v.unwrap_or_default()).into_bytes()
        })
    }

    /// A record value or header value: none, empty, hostile bytes, JSON (also forms
    /// serde_json does not write), almost-JSON (valid JSON cut short or with bytes
    /// inserted), and large ones.
    fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
        let samples = prop::sample::select(vec![
            &br#"{ "a" : [ 1 , 2.5e-3 , -0 ] }"#[..],
            br#""\u00e9\ud800\/\"\\\b\f\n\r\t""#,
            b"1E+5",
            b"[]",
            b" {} ",
            b"\"\xff\"",
            b"01",
            b"1.",
            b".5",
            b"+1",
            b"NaN",
            b"tru",
            b"nulll",
            b"[1,]",
            br#"{"a":1,}"#,
            br#"{"a"}"#,
            b"\"unterminated",
            br#""bad \x escape""#,
            b"\"raw\ncontrol\"",
            b"1 2",
            b"{} x",
            "\u{feff}{}".as_bytes(),
            b"\x0c1",
            b"null",
            b"true",
        ]);
        let almost_json = (json_text(), any::<prop::sample::Index>(), hostile_bytes(3)).prop_map(
            |(mut j, at, junk)| {
                let at = at.index(j.len() + 1);
                if junk.is_empty() {
                    j.truncate(at);
                } else {
                    j.splice(at..at, junk);
                }
                j
            },
        );
        let large = prop_oneof![
            (hostile_bytes(8), 100..600usize).prop_map(|(b, n)| b.repeat(n)),
            (0..20_000usize).prop_map(|n| format!(r#"{{"pad":"{}"}}"#, "x".repeat(n)).into_bytes()),
        ];
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(Vec::new())),
            4 => hostile_bytes(12).prop_map(Some),
            3 => json_text().prop_map(Some),
            2 => samples.prop_map(|s| Some(s.to_vec())),
            2 => almost_json.prop_map(Some),
            1 => large.prop_map(Some),
        ]
    }

    /// Header names from a small set, so names repeat; marker and dead-letter names
    /// among them, and names that are not UTF-8.
    fn header_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => prop::sample::select(vec![
                &b"txn-id"[..], b"txn-type", b"txn-count", b"txn-dlq-reason", b"txn-dlq-",
                b"txn-dlq-\xff", b"txn-dl", b"a", b"b", b"zeta", "é".as_bytes(), b"", b"\xff",
                b"\xc3\x28", b"q\"\\\n",
            ])
            .prop_map(<[u8]>::to_vec),
            1 => hostile_bytes(6),
        ]
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            any::<i64>(),
            prop::option::of(any::<i64>()),
            prop::option::of(hostile_bytes(8)),
            value(),
            prop::collection::vec((header_name(), value()), 0..8),
        )
            .prop_map(|(offset, ts, key, value, headers)| {
                let h: Vec<(&[u8], Option<&[u8]>)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_deref()))
                    .collect();
                Record::new(offset, ts, key.as_deref(), value.as_deref(), &h)
            })
    }

    /// The default marker names, or others (a marker name may be any text).
    fn header_names() -> impl Strategy<Value = HeaderNames> {
        let name = || prop::sample::select(vec!["txn-id", "a", "zeta", "é", "", "q\"\\\n"]);
        prop_oneof![
            Just(names()),
            (name(), name(), name()).prop_map(|(id, kind, count)| HeaderNames {
                id: id.into(),
                kind: kind.into(),
                count: count.into(),
            }),
        ]
    }

    /// Shapes the property test's generators do not reach: large, deep and many.
    #[test]
    fn large_deep_and_many_render_byte_identical_to_the_serde_renderer() {
        let deep = |n: usize| [vec![b'['; n], vec![b']'; n]].concat();
        let values: Vec<Vec<u8>> = vec![
            deep(200),
            vec![0x01; 1 << 20],
            vec![b'"'; 1 << 18],
            b"\r\n\t {\"a\": [1, 2]}\t\r\n".to_vec(),
            br#""\ud800""#.to_vec(),
            b"1e99999".to_vec(),
            b"\"".to_vec(),
            (0..=255u8).cycle().take(1 << 16).collect(),
        ];
        let mut recs: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Record::new(i as i64, None, Some(v), Some(v), &[(b"h", Some(v))]))
            .collect();
        // Many headers with repeats and binary names, and many tasks.
        let many: Vec<(Vec<u8>, Vec<u8>)> = (0..500u32)
            .map(|i| (vec![b'h', (i % 7) as u8 + 0x7e], i.to_string().into_bytes()))
            .collect();
        let h: Vec<(&[u8], Option<&[u8]>)> = many
            .iter()
            .map(|(k, v)| (k.as_slice(), Some(v.as_slice())))
            .collect();
        recs.push(Record::new(100, Some(1), None, Some(b"{}"), &h));
        recs.extend((0..3000).map(|i| task(1000 + i, b"plain")));
        let txn = ReadyTxn {
            topic: "t\"".into(),
            partition: i32::MIN,
            id: "id\u{1}\\".into(),
            commit_offset: i64::MIN,
            first_offset: 0,
            tasks: recs.into_iter().collect(),
            marker: task(0, b""),
            committed_at: Instant::now(),
        };
        let new = render_body(&txn, &names());
        assert!(new == serde_reference::render_body_serde(&txn, &names()));
        // Held at its length although 1 MiB of control characters escaped to 6 MiB.
        assert!(new.len() > 6 << 20);
        assert_eq!(new.capacity(), new.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The hand-written body is byte for byte what the serde renderer wrote.
        #[test]
        fn body_is_byte_identical_to_the_serde_renderer(
            tasks in prop::collection::vec(record(), 0..6),
            names in header_names(),
            id in ".{0,8}",
            topic in ".{0,8}",
            partition in any::<i32>(),
            commit_offset in any::<i64>(),
        ) {
            let txn = ReadyTxn {
                topic: topic.into(),
                partition,
                id,
                commit_offset,
                first_offset: 0,
                tasks: tasks.into_iter().collect(),
                marker: task(commit_offset, b""),
                committed_at: Instant::now(),
            };
            let new = render_body(&txn, &names);
            let old = serde_reference::render_body_serde(&txn, &names);
            prop_assert!(
                new == old,
                "\nnew: {}\nold: {}",
                String::from_utf8_lossy(&new),
                String::from_utf8_lossy(&old)
            );
        }
    }
}

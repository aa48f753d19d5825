//! The request body of the HTTP contract: [`render_body`] turns a committed transaction
//! into the JSON the app receives, keys and headers lossless (base64 where not UTF-8).

use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::config::HeaderNames;
use crate::dlq::DLQ_HEADER_PREFIX;

use super::ReadyTxn;

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

/// Renders the request body of the brief's HTTP contract.
///
/// Only marker fields must be text: a task's key and headers are data and reach the app
/// losslessly (base64 where they are not UTF-8, flagged by the `*_encoding` fields and
/// `base64_headers`). Marker headers and `txn-dlq-*` headers are not rendered.
pub fn render_body(txn: &ReadyTxn, names: &HeaderNames) -> Vec<u8> {
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
                            TaskValue::Base64(base64::engine::general_purpose::STANDARD.encode(v)),
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::delivery::testing::task;
    use crate::protocol::{Record, Records};

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
}

//! The only `unsafe` code of txn-sidecar, kept apart so the main crate can
//! `#![forbid(unsafe_code)]`: reads of librdkafka's C API that rust-rdkafka's safe API
//! does not offer.
//!
//! - [`raw_headers`]: a message's headers with their names as raw bytes. rust-rdkafka's
//!   `Headers::get` unwraps each name as UTF-8 and panics on one that is not, so one
//!   hostile record would become a crash loop.
//! - [`set_mock_group_consumer_timing`]: the KIP-848 session timeout and heartbeat
//!   interval of librdkafka's mock cluster, and [`set_mock_group_initial_rebalance_delay`]:
//!   its classic coordinator's first-join wait; rust-rdkafka's `MockCluster` lacks both.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

use std::ffi::CStr;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::message::BorrowedMessage;
use rdkafka::ClientContext;

/// One header: its name's bytes (without the C string's NUL) and its value, `None` for
/// a null value (distinct from an empty one).
pub type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// How many headers [`RawHeaders`] holds without a heap allocation: the marker protocol
/// uses two, and most producers add at most a couple more.
pub const INLINE_HEADERS: usize = 4;

/// A message's headers as [`raw_headers`] returns them.
pub type RawHeaders<'a> = smallvec::SmallVec<[RawHeader<'a>; INLINE_HEADERS]>;

/// The headers of `msg`, in record order (duplicates kept), borrowed from the message.
///
/// Up to [`INLINE_HEADERS`] headers are held inline: the common record costs no heap
/// allocation here (this runs once per consumed record).
///
/// Empty when the record has none or librdkafka cannot parse them (it then reports the
/// same error for every read, so there is nothing partial to return).
///
/// A name holding a NUL byte ends at it: librdkafka hands names out as C strings and
/// keeps their length to itself. Values are exact (`size` bytes, NUL bytes included).
///
/// librdkafka parses a message's headers on first access and caches them in the message;
/// like rust-rdkafka's own `headers()`, this must not run on one message from two threads
/// at once (the sidecar reads each message on the one thread that polled it).
#[inline]
pub fn raw_headers<'a>(msg: &'a BorrowedMessage<'_>) -> RawHeaders<'a> {
    let mut out = RawHeaders::new();
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is a live message owned by the consumer for the borrow's
    // lifetime; librdkafka returns a headers pointer owned by that message (not to be
    // freed) or an error when there are none.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return out;
    }
    // SAFETY: `hdrs` is valid while `msg` is borrowed.
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    out.reserve_exact(count);
    for idx in 0..count {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: idx < count; the out-pointers are valid locals.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka stores header names NUL-terminated; the value is `size`
        // bytes or NULL, both owned by the message and alive for `'a`.
        let name: &'a [u8] = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value: Option<&'a [u8]> = if value.is_null() {
            None
        } else {
            // SAFETY: as above.
            Some(unsafe { std::slice::from_raw_parts(value as *const u8, size) })
        };
        out.push((name, value));
    }
    out
}

/// Sets the KIP-848 consumer-group session timeout and heartbeat interval (ms) of the
/// mock cluster that `client` hosts (one created with `test.mock.num.brokers`).
///
/// Returns `false`, changing nothing, when `client` hosts no mock cluster.
pub fn set_mock_group_consumer_timing<C: ClientContext>(
    client: &Client<C>,
    session_timeout_ms: i32,
    heartbeat_interval_ms: i32,
) -> bool {
    with_mock_cluster(client, |mc| {
        // SAFETY: `mc` is the live mock cluster; the setters take the cluster's own lock.
        unsafe {
            rd::rd_kafka_mock_set_group_consumer_session_timeout_ms(mc, session_timeout_ms);
            rd::rd_kafka_mock_set_group_consumer_heartbeat_interval_ms(mc, heartbeat_interval_ms);
        }
    })
}

/// Sets how long (ms) the classic-protocol group coordinator of the mock cluster that
/// `client` hosts waits for more members before completing a group's first join
/// (librdkafka's default: 3000, like a broker's `group.initial.rebalance.delay.ms`).
///
/// Returns `false`, changing nothing, when `client` hosts no mock cluster.
pub fn set_mock_group_initial_rebalance_delay<C: ClientContext>(
    client: &Client<C>,
    delay_ms: i32,
) -> bool {
    with_mock_cluster(client, |mc| {
        // SAFETY: `mc` is the live mock cluster; the setter takes the cluster's own lock.
        unsafe { rd::rd_kafka_mock_group_initial_rebalance_delay_ms(mc, delay_ms) }
    })
}

/// Runs `set` on the mock cluster `client` hosts; `false` when it hosts none.
fn with_mock_cluster<C: ClientContext>(
    client: &Client<C>,
    set: impl FnOnce(*mut rd::rd_kafka_mock_cluster_t),
) -> bool {
    // SAFETY: `client` is live for the call; librdkafka returns the mock cluster it owns
    // (freed only with the client, which outlives `set`) or NULL.
    let mc = unsafe { rd::rd_kafka_handle_mock_cluster(client.native_ptr()) };
    if mc.is_null() {
        return false;
    }
    set(mc);
    true
}

//! Protocol v1 between `worker` and its plugins: newline-delimited JSON-RPC 2.0 over stdio.
//!
//! This crate is everything a plugin author or the worker needs to speak the protocol and
//! nothing more: the JSON-RPC envelope ([`message`]), the typed parameters and results of
//! every method ([`methods`]), the line framing with its length limit ([`codec`]), and a small
//! synchronous SDK for writing a plugin in Rust ([`plugin`]). The normative specification is
//! `PROTOCOL.md` beside this crate; every message it shows round-trips through these types.
//!
//! The message types are plain data: no I/O and no async runtime types, so the worker (tokio)
//! and plugins (threads) share them.
//!
//! The crate README, with a complete plugin, follows.
#![doc = include_str!("../README.md")]

pub mod backends;
pub mod codec;
pub mod files;
pub mod message;
pub mod methods;
mod outbox;
pub mod plugin;
mod plugin_backends;
mod plugin_error;
mod plugin_offers;
mod plugin_pool;
mod plugin_tasks;

pub use backends::*;
pub use codec::{encode_line, Frame, LineDecoder, DEFAULT_MAX_LINE_BYTES};
pub use message::{
    append_request_line, request_line, request_line_with, ErrorObject, Id, Message, Notification,
    ParseError, Request, Response,
};
pub use methods::*;

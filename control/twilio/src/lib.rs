//! Twilio Programmable Voice wire formats for precall's webhook front door.
//!
//! Twilio calls precall with `application/x-www-form-urlencoded` webhooks signed with
//! `X-Twilio-Signature`, and expects TwiML back. This crate holds everything about those bytes
//! and nothing else:
//!
//! - [`form`]: decode a webhook body or query string into ordered `(name, value)` pairs
//!   ([`parse_form`], [`parse_query`], [`Params`]), with hard limits.
//! - [`signature`]: compute and check `X-Twilio-Signature` exactly as Twilio's own library does
//!   ([`RequestValidator`]), including the `bodySHA256` scheme for JSON bodies.
//! - [`twiml`]: the only place TwiML is made: [`twiml::render`] turns the controller's
//!   [`precall_api::CallInstructions`] into a `<Response>`, [`twiml::hangup`] ends a call politely.
//! - [`status`]: Twilio's `CallStatus` values ([`TwilioCallStatus`]).
//!
//! The crate is pure: no sockets, no clock, no runtime, no logging. The control shell reads the
//! request, calls in here with bytes and strings, and writes what comes back. Every rule is
//! checked against vectors generated with the `twilio` Python package (`tests/vectors/`).
#![forbid(unsafe_code)]

pub mod form;
pub mod signature;
pub mod status;
pub mod twiml;

pub use form::{FormError, MAX_FIELDS, Params, parse_form, parse_query};
pub use signature::{RequestValidator, SIGNATURE_HEADER};
pub use status::{TwilioCallStatus, UnknownCallStatus};
pub use twiml::TwimlUrls;

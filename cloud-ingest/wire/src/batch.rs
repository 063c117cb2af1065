//! The protobuf messages of `batch.proto` ([`Batch`], [`Record`], [`Attribute`]), generated from
//! it at build time (`build.rs`, protox and prost-build): the schema is the one source.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/edgegw.v1.rs"));

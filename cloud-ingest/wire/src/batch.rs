//! The protobuf messages of `batch.proto` ([`Batch`], [`Record`], [`Attribute`]) and of
//! `batch_v2.proto` ([`v2::Batch`], the columnar body), generated from them at build time
//! (`build.rs`, protox and prost-build): the schemas are the one source.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/edgegw.v1.rs"));

/// Body version 2: the same records as columns (`batch_v2.proto`; see `crate::columnar`).
pub mod v2 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/edgegw.v2.rs"));
}

//! `subject.export`: everything held about one data subject of a tenant, as JSON Lines — to an
//! S3 object (server-side encrypted, uploaded in parts as it is read, handed out by a presigned
//! URL of bounded life) or, from the command line, to standard output — with a manifest that
//! counts the records per table (docs/personal-data.md#exporting-a-subject).

use std::io;
use std::time::Duration;

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use chrono::{DateTime, Utc};
use meterbridge::config::{ConfigError, Env};
use meterbridge::domain::Tenant;
use meterbridge::repo::subject_export::{self, ExportError, LineSink};
use meterbridge::repo::tenants;
use meterbridge::Database;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::AdminError;
use crate::subject::checked_actor_id;

/// The manifest's `format`: what a reader of the records may rely on.
pub const FORMAT: &str = "meterbridge.subject-export.v1";

/// Where `admin subject export` writes: the S3 store, or standard output (the command line
/// only; a Lambda payload always writes to S3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Destination {
    #[default]
    S3,
    Stdout,
}

/// The bucket exports go to (`EXPORT_BUCKET`), their encryption, and how long a link to one
/// lives.
#[derive(Clone)]
pub struct ExportStore {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    /// `EXPORT_KMS_KEY_ID`: SSE-KMS with this key; SSE-S3 (AES-256) without it.
    pub kms_key_id: Option<String>,
    /// `EXPORT_URL_TTL_SECONDS`: 60-3,600, 900 by default.
    pub url_ttl: Duration,
    /// Bytes a part holds before it is uploaded (at least S3's 5 MiB): the export's memory.
    pub part_size: usize,
}

pub const DEFAULT_URL_TTL: Duration = Duration::from_secs(900);
pub const MAX_URL_TTL: Duration = Duration::from_secs(3_600);
/// S3's smallest part but the last.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
pub const PART_SIZE: usize = 8 * 1024 * 1024;

impl ExportStore {
    /// The store `EXPORT_BUCKET` names, or none when it is not set.
    pub fn from_env<F: Fn(&str) -> Option<String>>(
        env: &Env<F>,
        aws: &aws_config::SdkConfig,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(bucket) = env.optional("EXPORT_BUCKET") else {
            return Ok(None);
        };
        let ttl = env.bounded_or(
            "EXPORT_URL_TTL_SECONDS",
            DEFAULT_URL_TTL.as_secs(),
            60..=MAX_URL_TTL.as_secs(),
        )?;
        Ok(Some(ExportStore {
            client: s3_client(aws),
            bucket,
            kms_key_id: env.optional("EXPORT_KMS_KEY_ID"),
            url_ttl: Duration::from_secs(ttl),
            part_size: PART_SIZE,
        }))
    }

    fn encryption(&self) -> (ServerSideEncryption, Option<String>) {
        match &self.kms_key_id {
            Some(key) => (ServerSideEncryption::AwsKms, Some(key.clone())),
            None => (ServerSideEncryption::Aes256, None),
        }
    }
}

/// An S3 client for `aws`; path-style addressing when an endpoint is set (moto locally).
pub fn s3_client(aws: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::from(aws)
        .force_path_style(aws.endpoint_url().is_some())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The export's description, written beside the records (and returned).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: &'static str,
    pub tenant: String,
    /// The subject as erasure receipts name it (salted hash), never the id.
    pub subject: String,
    /// Records stored before this instant (the database's clock) are in the export.
    pub as_of: DateTime<Utc>,
    pub counts: subject_export::Counts,
    pub records: u64,
    pub bytes: u64,
    /// SHA-256 of the records file, hex.
    pub sha256: String,
}

/// What `subject.export` asks for, as it arrived.
pub struct Asked<'a> {
    pub tenant: &'a str,
    pub actor_id: &'a str,
}

/// Counts what passes through to the manifest (bytes, lines, SHA-256).
struct Tally<S> {
    inner: S,
    hash: Sha256,
    bytes: u64,
    records: u64,
}

impl<S: LineSink> LineSink for Tally<S> {
    async fn line(&mut self, json: &str) -> io::Result<()> {
        self.hash.update(json.as_bytes());
        self.hash.update(b"\n");
        self.bytes += json.len() as u64 + 1;
        self.records += 1;
        self.inner.line(json).await
    }
}

/// Lines to any writer (standard output; a buffer in tests).
pub struct WriterSink<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> LineSink for WriterSink<W> {
    async fn line(&mut self, json: &str) -> io::Result<()> {
        self.0.write_all(json.as_bytes()).await?;
        self.0.write_all(b"\n").await
    }
}

/// The export as JSON Lines to `out`, and its manifest.
pub async fn to_writer<W: AsyncWrite + Unpin + Send>(
    db: &Database,
    asked: &Asked<'_>,
    out: W,
) -> Result<Manifest, AdminError> {
    let (tenant, actor) = checked(db, asked).await?;
    let mut sink = tally(WriterSink(out));
    let export = subject_export::export(db.pool(), tenant.id, actor, &mut sink)
        .await
        .map_err(export_error)?;
    sink.inner.0.flush().await.map_err(write_error)?;
    manifest(db, asked, tenant.id, export, sink).await
}

/// The export to the store: records, then manifest, then links to both.
pub async fn to_s3(
    db: &Database,
    store: &ExportStore,
    asked: &Asked<'_>,
) -> Result<Value, AdminError> {
    let (tenant, actor) = checked(db, asked).await?;
    // The object key names the tenant and a new id, never the subject.
    let prefix = format!(
        "subject-exports/{}/{}",
        tenant.slug.as_str(),
        uuid::Uuid::now_v7()
    );
    let records_key = format!("{prefix}/records.jsonl");
    let mut sink = tally(S3Upload::new(store, records_key.clone()));
    let exported = subject_export::export(db.pool(), tenant.id, actor, &mut sink).await;
    let export = match exported {
        Ok(export) => export,
        Err(e) => {
            sink.inner.abort().await;
            return Err(export_error(e));
        }
    };
    sink.inner.finish().await.map_err(write_error)?;
    let manifest = manifest(db, asked, tenant.id, export, sink).await?;
    let manifest_key = format!("{prefix}/manifest.json");
    let body =
        serde_json::to_vec_pretty(&manifest).map_err(|e| write_error(io::Error::other(e)))?;
    let (sse, kms) = store.encryption();
    store
        .client
        .put_object()
        .bucket(&store.bucket)
        .key(&manifest_key)
        .content_type("application/json")
        .server_side_encryption(sse)
        .set_ssekms_key_id(kms)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| write_error(s3_error(e)))?;
    let expires_at = Utc::now() + store.url_ttl;
    Ok(json!({
        "tenant": asked.tenant,
        "manifest": manifest,
        "records": link(store, &records_key).await?,
        "manifestObject": link(store, &manifest_key).await?,
        "expiresAt": expires_at,
    }))
}

/// The object's address and a presigned GET of the store's URL life.
async fn link(store: &ExportStore, key: &str) -> Result<Value, AdminError> {
    let presigning = PresigningConfig::expires_in(store.url_ttl)
        .map_err(|e| AdminError::BadRequest(format!("EXPORT_URL_TTL_SECONDS: {e}")))?;
    let request = store
        .client
        .get_object()
        .bucket(&store.bucket)
        .key(key)
        .presigned(presigning)
        .await
        .map_err(|e| write_error(s3_error(e)))?;
    Ok(json!({"s3Uri": format!("s3://{}/{key}", store.bucket), "url": request.uri()}))
}

async fn checked<'a>(db: &Database, asked: &Asked<'a>) -> Result<(Tenant, &'a str), AdminError> {
    let actor = checked_actor_id(asked.actor_id)?;
    let tenant = tenants::find_by_slug(db.pool(), asked.tenant)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no tenant with slug {:?}", asked.tenant)))?;
    Ok((tenant, actor))
}

fn tally<S>(inner: S) -> Tally<S> {
    Tally {
        inner,
        hash: Sha256::new(),
        bytes: 0,
        records: 0,
    }
}

async fn manifest<S>(
    db: &Database,
    asked: &Asked<'_>,
    tenant: meterbridge::domain::TenantId,
    export: subject_export::Export,
    sink: Tally<S>,
) -> Result<Manifest, AdminError> {
    Ok(Manifest {
        format: FORMAT,
        tenant: asked.tenant.to_owned(),
        subject: subject_export::subject_hash(db.pool(), tenant, asked.actor_id).await?,
        as_of: export.as_of,
        counts: export.counts,
        records: sink.records,
        bytes: sink.bytes,
        sha256: hex::encode(sink.hash.finalize()),
    })
}

fn export_error(e: ExportError) -> AdminError {
    match e {
        ExportError::Database(db) => AdminError::Database(db),
        ExportError::Write(io) => write_error(io),
    }
}

fn write_error(e: io::Error) -> AdminError {
    AdminError::Unavailable(format!("writing the export: {e}"))
}

fn s3_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::other(DisplayErrorContext(e).to_string())
}

/// Records to one S3 object, in parts of the store's part size: the multipart upload starts
/// with the first full part (a smaller export is one `PutObject`), so memory holds one part.
struct S3Upload<'a> {
    store: &'a ExportStore,
    key: String,
    upload_id: Option<String>,
    part: Vec<u8>,
    parts: Vec<CompletedPart>,
}

impl<'a> S3Upload<'a> {
    fn new(store: &'a ExportStore, key: String) -> Self {
        S3Upload {
            store,
            key,
            upload_id: None,
            part: Vec::new(),
            parts: Vec::new(),
        }
    }

    async fn upload_part(&mut self) -> io::Result<()> {
        let store = self.store;
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let (sse, kms) = store.encryption();
                let started = store
                    .client
                    .create_multipart_upload()
                    .bucket(&store.bucket)
                    .key(&self.key)
                    .content_type("application/x-ndjson")
                    .server_side_encryption(sse)
                    .set_ssekms_key_id(kms)
                    .send()
                    .await
                    .map_err(s3_error)?;
                let id = started
                    .upload_id()
                    .ok_or_else(|| io::Error::other("S3 returned no upload id"))?
                    .to_owned();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number =
            i32::try_from(self.parts.len() + 1).map_err(|_| io::Error::other("too many parts"))?;
        let body = std::mem::take(&mut self.part);
        let uploaded = store
            .client
            .upload_part()
            .bucket(&store.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(s3_error)?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(uploaded.e_tag().map(str::to_owned))
                .build(),
        );
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        let store = self.store;
        if self.upload_id.is_none() {
            let (sse, kms) = store.encryption();
            store
                .client
                .put_object()
                .bucket(&store.bucket)
                .key(&self.key)
                .content_type("application/x-ndjson")
                .server_side_encryption(sse)
                .set_ssekms_key_id(kms)
                .body(ByteStream::from(std::mem::take(&mut self.part)))
                .send()
                .await
                .map_err(s3_error)?;
            return Ok(());
        }
        if !self.part.is_empty() {
            if let Err(e) = self.upload_part().await {
                self.abort().await;
                return Err(e);
            }
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let completed = store
            .client
            .complete_multipart_upload()
            .bucket(&store.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = completed {
            self.abort().await;
            return Err(s3_error(e));
        }
        Ok(())
    }

    /// Gives up the upload: S3 drops its parts (the bucket's lifecycle rule also does, a day
    /// after, should this call fail too).
    async fn abort(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let aborted = self
            .store
            .client
            .abort_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(error = %DisplayErrorContext(e), "aborting an export's upload failed");
        }
    }
}

impl LineSink for S3Upload<'_> {
    async fn line(&mut self, json: &str) -> io::Result<()> {
        self.part.extend_from_slice(json.as_bytes());
        self.part.push(b'\n');
        if self.part.len() >= self.store.part_size.max(MIN_PART_SIZE) {
            self.upload_part().await?;
        }
        Ok(())
    }
}

#!/usr/bin/env node
// The benchmark's S3 server: s3rver 3.7.1 plus what a benchmark needs from it.
//
//   * A correct listing.  s3rver walks the store in readdir order (so keys come
//     back unsorted and start-after pagination skips keys) and reports a
//     CommonPrefix only for a folder holding a key directly (a folder holding
//     only subfolders vanishes from a delimiter listing).  We replace the
//     store's listObjects with one that sorts and rolls up every folder.
//   * Cheaper metadata: s3rver reads two small files per key for every
//     listed key (about 0.25 ms each, several times what S3 spends per listed
//     key); we keep them in memory, checked against the object file's stat.
//   * If-Match on GET and HEAD, as S3 does it (412 when the ETag differs):
//     s3rver 3.7.1 ignores the header, and lazyfs sends it on every ranged GET.
//   * Counters: requests and bytes sent by kind (ranged GET, GET, HEAD, LIST,
//     write, other) and per key for GETs, read over a Unix socket so that
//     reading them is never counted as traffic.
//   * An optional delay before each request is handled: the first-byte
//     latency of a real object store ("wan" mode).
//   * Optional additional checksums (--checksums FILE, JSON {"bucket/key":
//     [algorithm, base64 value]}, computed by the harness): what S3 keeps of
//     every object uploaded since December 2024 (a CRC64NVME).  As S3 does, a
//     listing names the algorithm and a HEAD or a whole-object GET asked with
//     x-amz-checksum-mode: ENABLED carries the value.
//
// Usage: node --openssl-legacy-provider s3rver_wrapper.js --dir DIR --address IP
//          --port N --stats-socket PATH --bucket NAME [--delay-ms MS] [--checksums FILE]
// (s3rver's ListObjectsV2 continuation tokens use DES, which OpenSSL 3 only
// offers through the legacy provider.)  s3rver is found through NODE_PATH.
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');

const S3rver = require('s3rver');
const FilesystemStore = require('s3rver/lib/stores/filesystem');
const S3Object = require('s3rver/lib/models/object');
const S3Error = require('s3rver/lib/models/error');

const OBJECT_SUFFIX = '._S3rver_object';
const RESERVED = '._S3rver_';
// Bucket sub-resources: a GET on the bucket with one of these is not a listing.
const BUCKET_SUBRESOURCES = ['acl', 'cors', 'location', 'policy', 'tagging', 'versioning',
  'website', 'uploads', 'lifecycle', 'logging', 'notification', 'encryption'];
const OBJECT_SUBRESOURCES = ['acl', 'tagging', 'uploadId', 'uploads', 'retention', 'legal-hold'];

function parseArgs(argv) {
  const opts = { address: '127.0.0.1', delayMs: 0, buckets: [] };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--dir') opts.dir = value;
    else if (flag === '--address') opts.address = value;
    else if (flag === '--port') opts.port = Number(value);
    else if (flag === '--stats-socket') opts.statsSocket = value;
    else if (flag === '--bucket') opts.buckets.push(value);
    else if (flag === '--delay-ms') opts.delayMs = Number(value);
    else if (flag === '--checksums') opts.checksums = JSON.parse(fs.readFileSync(value, 'utf8'));
    else throw new Error(`unknown option ${flag}`);
  }
  if (!opts.dir || !opts.port || !opts.statsSocket || !opts.buckets.length) {
    throw new Error('--dir, --port, --stats-socket and --bucket are required');
  }
  return opts;
}

// --- the listing ---------------------------------------------------------------

// Keys of every object at or below `dir` (a folder of the bucket named by `rel`).
function* keysBelow(dir, rel) {
  let entries;
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch (err) {
    if (err.code === 'ENOENT' || err.code === 'ENOTDIR') return;
    throw err;
  }
  for (const e of entries) {
    if (e.isDirectory()) {
      if (!e.name.startsWith(RESERVED)) yield* keysBelow(path.join(dir, e.name), `${rel}${e.name}/`);
    } else if (e.name.endsWith(OBJECT_SUFFIX)) {
      yield rel + e.name.slice(0, -OBJECT_SUFFIX.length);
    }
  }
}

function holdsAnObject(dir) {
  return !keysBelow(dir, '').next().done;
}

// Direct keys and rolled-up prefixes under `prefix`.  With the '/' delimiter a
// subfolder becomes one CommonPrefix as soon as it is known to hold an object,
// so listing a folder of 100 folders does not read all 10,000 files below.
function collect(root, prefix, delimiter) {
  const base = prefix.slice(0, prefix.lastIndexOf('/') + 1);
  const keys = [];
  const prefixes = new Set();
  if (delimiter === '/') {
    let entries = [];
    try {
      entries = fs.readdirSync(path.join(root, base), { withFileTypes: true });
    } catch (err) {
      if (err.code !== 'ENOENT' && err.code !== 'ENOTDIR') throw err;
    }
    for (const e of entries) {
      const name = base + e.name;
      if (e.isDirectory() && !e.name.startsWith(RESERVED)) {
        if ((name + '/').startsWith(prefix) && holdsAnObject(path.join(root, name))) prefixes.add(name + '/');
      } else if (e.name.endsWith(OBJECT_SUFFIX)) {
        const key = name.slice(0, -OBJECT_SUFFIX.length);
        if (key.startsWith(prefix)) keys.push(key);
      }
    }
    return { keys, prefixes };
  }
  for (const key of keysBelow(path.join(root, base), base)) {
    if (!key.startsWith(prefix)) continue;
    const cut = delimiter ? key.indexOf(delimiter, prefix.length) : -1;
    if (cut === -1) keys.push(key);
    else prefixes.add(key.slice(0, cut + delimiter.length));
  }
  return { keys, prefixes };
}

// Pages are cut on keys only (the controller builds the continuation token from
// the last key), and each prefix is reported on the page whose key range holds it.
FilesystemStore.prototype.listObjects = async function listObjects(bucket, options) {
  const { delimiter = '', startAfter = '', prefix = '', maxKeys = Infinity } = options;
  const found = collect(this.getBucketPath(bucket), prefix, delimiter);
  const after = found.keys.filter(k => k > startAfter).sort();
  const isTruncated = after.length > maxKeys;
  const page = isTruncated ? after.slice(0, maxKeys) : after;
  const last = isTruncated ? page[page.length - 1] : null;
  const commonPrefixes = [...found.prefixes]
    .filter(p => p > startAfter && (last === null || p < last))
    .sort();
  const metadata = await Promise.all(page.map(key => this.getMetadata(bucket, key).catch(err => {
    if (err.code === 'ENOENT') return undefined; // deleted while we listed
    throw err;
  })));
  const objects = [];
  page.forEach((key, i) => {
    if (metadata[i] !== undefined) objects.push(new S3Object(bucket, key, null, metadata[i]));
  });
  return { objects, commonPrefixes, isTruncated };
};

// --- metadata ------------------------------------------------------------------

const readMetadata = FilesystemStore.prototype.getMetadata;
const metadataCache = new Map();

// A rewritten object gets a new mtime (or size or inode), which retires its entry.
FilesystemStore.prototype.getMetadata = async function getMetadata(bucket, key) {
  const objectPath = this.getResourcePath(bucket, key, 'object');
  const st = await fs.promises.stat(objectPath); // throws ENOENT for a missing key, as s3rver's does
  const stamp = `${st.mtimeMs}:${st.size}:${st.ino}`;
  const hit = metadataCache.get(objectPath);
  if (hit && hit.stamp === stamp) return { ...hit.metadata };
  const metadata = await readMetadata.call(this, bucket, key);
  metadataCache.set(objectPath, { stamp, metadata });
  return { ...metadata };
};

// --- counting ------------------------------------------------------------------

function target(ctx) {
  const parts = ctx.path.split('/').filter(Boolean);
  const bucket = parts.length ? decodeURIComponent(parts[0]) : '';
  const key = parts.length > 1 ? decodeURIComponent(ctx.path.slice(ctx.path.indexOf('/', 1) + 1)) : '';
  return { bucket, key };
}

function kindOf(ctx, t) {
  const q = ctx.query;
  const m = ctx.method;
  if (m === 'PUT' || m === 'POST' || m === 'DELETE') return 'write';
  if (t.key) {
    if (OBJECT_SUBRESOURCES.some(s => s in q)) return 'other';
    if (m === 'HEAD') return 'head';
    if (m === 'GET') return ctx.headers.range ? 'get_range' : 'get';
    return 'other';
  }
  if (m === 'GET' && t.bucket && !BUCKET_SUBRESOURCES.some(s => s in q)) return 'list';
  return 'other';
}

const KINDS = ['get_range', 'get', 'head', 'list', 'write', 'other'];
const stats = {
  kinds: Object.fromEntries(KINDS.map(k => [k, { requests: 0, bytes: 0 }])),
  status: {},
  keys: {}, // GETs by key: {requests, bytes}
  connections: 0,
  closedBytes: 0,
};
const liveSockets = new Set();

// Bytes a response put on its socket: requests on one keep-alive connection are
// served one after another, so the socket's counter moves only for this one.
// An aborted response ends with 'close' and no 'finish'.
function countResponse(ctx, kind, key) {
  const sock = ctx.req.socket;
  const before = sock.bytesWritten;
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    const bytes = sock.bytesWritten - before;
    stats.status[ctx.status] = (stats.status[ctx.status] || 0) + 1;
    stats.kinds[kind].bytes += bytes;
    if (key && (kind === 'get' || kind === 'get_range')) {
      const k = stats.keys[key] || (stats.keys[key] = { requests: 0, bytes: 0 });
      k.requests += 1;
      k.bytes += bytes;
    }
  };
  ctx.res.once('finish', finish);
  ctx.res.once('close', finish);
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

const XML_ENTITIES = { '&amp;': '&', '&lt;': '<', '&gt;': '>', '&quot;': '"', '&apos;': "'" };

// The additional checksum S3 would answer: in a HEAD's or a whole GET's headers
// when asked for, and its algorithm in each listed object.
function addChecksums(ctx, t, kind, checksums) {
  if (ctx.status >= 300) return;
  if ((kind === 'head' || kind === 'get') && t.key) {
    const found = checksums[`${t.bucket}/${t.key}`];
    if (found && (ctx.headers['x-amz-checksum-mode'] || '').toUpperCase() === 'ENABLED') {
      ctx.set(`x-amz-checksum-${found[0].toLowerCase()}`, found[1]);
      ctx.set('x-amz-checksum-type', 'FULL_OBJECT');
    }
  } else if (kind === 'list' && typeof ctx.body === 'string') {
    ctx.body = ctx.body.replace(/<Contents>([\s\S]*?)<\/Contents>/g, (whole, inner) => {
      const key = /<Key>([\s\S]*?)<\/Key>/.exec(inner);
      const name = key && key[1].replace(/&(amp|lt|gt|quot|apos);/g, e => XML_ENTITIES[e]);
      const found = name && checksums[`${t.bucket}/${name}`];
      return found ? `<Contents>${inner}<ChecksumAlgorithm>${found[0]}</ChecksumAlgorithm></Contents>` : whole;
    });
  }
}

function sameEtag(header, etag) {
  const want = etag.replace(/"/g, '');
  return header.split(',').some(v => {
    const t = v.trim().replace(/^W\//, '').replace(/"/g, '');
    return t === '*' || t === want;
  });
}

async function checkIfMatch(ctx, t, kind) {
  const header = ctx.headers['if-match'];
  if (!header || (kind !== 'get' && kind !== 'get_range' && kind !== 'head')) return;
  let metadata;
  try {
    metadata = await ctx.app.store.getMetadata(t.bucket, t.key);
  } catch (err) {
    return; // missing: s3rver answers NoSuchKey itself
  }
  if (!sameEtag(header, metadata.etag)) {
    throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold',
      { Condition: 'If-Match' });
  }
}

function snapshot(opts) {
  let live = 0;
  for (const s of liveSockets) live += s.bytesWritten || 0;
  return {
    server: `s3rver ${require('s3rver/package.json').version}`,
    node: process.version,
    pid: process.pid,
    delay_ms: opts.delayMs,
    if_match: 'enforced by the wrapper (s3rver ignores it)',
    kinds: stats.kinds,
    status: stats.status,
    keys: stats.keys,
    connections: stats.connections,
    bytes_total: stats.closedBytes + live,
  };
}

// --- main -------------------------------------------------------------------------

function main() {
  const opts = parseArgs(process.argv.slice(2));
  const app = new S3rver({
    address: opts.address,
    port: opts.port,
    directory: opts.dir,
    silent: true,
    configureBuckets: opts.buckets.map(name => ({ name })),
  });
  // Ahead of s3rver's own middleware, so the delay covers authentication and
  // the counters see the final status of every request.
  app.middleware.unshift(async (ctx, next) => {
    const t = target(ctx);
    const kind = kindOf(ctx, t);
    stats.kinds[kind].requests += 1;
    countResponse(ctx, kind, t.key);
    if (opts.delayMs > 0) await sleep(opts.delayMs);
    await checkIfMatch(ctx, t, kind); // a 412 thrown here is rendered by s3rver's error handler
    await next();
    if (opts.checksums) addChecksums(ctx, t, kind, opts.checksums);
  });
  app.on('error', () => {}); // S3 errors are answers, not crashes; s3rver logs nothing (silent)
  app.run().then(() => {
    // Longer than any client's idle pool timeout, so a kept-alive connection is
    // never closed under a client that is about to reuse it.
    app.httpServer.keepAliveTimeout = 120000;
    app.httpServer.headersTimeout = 121000;
    app.httpServer.on('connection', sock => {
      stats.connections += 1;
      liveSockets.add(sock);
      sock.once('close', () => {
        stats.closedBytes += sock.bytesWritten || 0;
        liveSockets.delete(sock);
      });
    });
    const side = http.createServer((req, res) => {
      const body = JSON.stringify(snapshot(opts));
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
      res.end(body);
    });
    try { fs.unlinkSync(opts.statsSocket); } catch (err) { /* not there */ }
    side.listen(opts.statsSocket, () => {
      process.stdout.write(`ready ${opts.address}:${opts.port}\n`);
    });
  }).catch(err => {
    process.stderr.write(`s3rver_wrapper: ${err && err.stack ? err.stack : err}\n`);
    process.exit(2);
  });
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(sig, () => process.exit(0));
}

main();

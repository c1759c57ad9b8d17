#!/usr/bin/env node
/**
 * imagemesh-ts: a small TypeScript client of imagemesh, built on the code ts-proto generates
 * from protos/ (clients/ts/gen) and @grpc/grpc-js. Every command prints one JSON document on
 * stdout; a failed call prints {"error": {"code", "message"}} on stderr and exits 1 (usage
 * errors exit 2).
 *
 *   imagemesh-ts [--address HOST:PORT] [--token T] [--tls [--ca FILE]] COMMAND ...
 *   imagemesh-ts upload FILE... [--dataset D] [--label L] [--tag T]...
 *   imagemesh-ts search [--dataset D] [--label L] [--text T] [--count-by label|predicted-class|dataset]
 *   imagemesh-ts classify FILE [--top-k N] [--model-version V]
 *
 * The token defaults to IMAGEMESH_AUTH_TOKEN and is sent as `authorization: Bearer <token>`.
 */
import { createHash } from "node:crypto";
import { createReadStream, readFileSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { basename } from "node:path";
import { parseArgs } from "node:util";

import { ChannelCredentials, Metadata, type ServiceError, status } from "@grpc/grpc-js";

import { type ClassifyResponse, InferenceServiceClient } from "../gen/imagemesh/inference/v1/inference";
import {
  CountField,
  type ImageDocument,
  type SearchImagesRequest,
  type SearchImagesResponse,
  SearchServiceClient,
} from "../gen/imagemesh/search/v1/search";
import {
  type Image,
  StorageServiceClient,
  type UploadImageRequest,
  type UploadImageResponse,
} from "../gen/imagemesh/storage/v1/storage";

/** Each upload message carries at most this many bytes: well under the server's message limit. */
const CHUNK_BYTES = 1 << 20;
/** Every call gives up after this long (the CLI's whole run has the same bound). */
const DEADLINE_MS = 60_000;
/** SearchImages' largest page (the contract's maximum). */
const PAGE_SIZE = 1000;

const COUNT_FIELDS: Record<string, CountField> = {
  label: CountField.COUNT_FIELD_LABEL,
  "predicted-class": CountField.COUNT_FIELD_PREDICTED_CLASS,
  dataset: CountField.COUNT_FIELD_DATASET,
};

/** A wrong command line: reported with exit code 2, never as an RPC failure. */
class UsageError extends Error {}

interface Connection {
  address: string;
  credentials: ChannelCredentials;
  metadata: () => Metadata;
}

function isServiceError(err: unknown): err is ServiceError {
  return err instanceof Error && typeof (err as Partial<ServiceError>).code === "number";
}

/** Options every call shares: the deadline; the bearer token travels in `metadata`. */
function callOptions(): { deadline: Date } {
  return { deadline: new Date(Date.now() + DEADLINE_MS) };
}

/** Resolves with a unary call's reply, or rejects with its ServiceError. */
function unary<T>(start: (done: (err: ServiceError | null, reply?: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => {
    start((err, reply) => (err !== null || reply === undefined ? reject(err) : resolve(reply)));
  });
}

async function sha256OfFile(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: CHUNK_BYTES })) {
    hash.update(chunk as Buffer);
  }
  return hash.digest("hex");
}

function imageSummary(image: Image | undefined, duplicate: boolean): Record<string, unknown> {
  return {
    name: image?.name ?? "",
    filename: image?.filename ?? "",
    sha256: image?.sha256 ?? "",
    dataset: image?.dataset ?? "",
    label: image?.label ?? "",
    sizeBytes: image?.sizeBytes ?? 0n,
    width: image?.width ?? 0,
    height: image?.height ?? 0,
    duplicate,
  };
}

/**
 * Uploads one file through the client-streaming contract: a header with the SHA-256 and size
 * computed here (the server verifies both), then the bytes in order. The file is read twice,
 * once to hash and once to send, so it is never whole in memory.
 */
async function uploadOne(
  client: StorageServiceClient,
  conn: Connection,
  path: string,
  header: { dataset: string; label: string; tags: string[] },
): Promise<UploadImageResponse> {
  const [sha256, info] = await Promise.all([sha256OfFile(path), stat(path)]);
  let stream: ReturnType<StorageServiceClient["uploadImage"]> | undefined;
  const reply = new Promise<UploadImageResponse>((resolve, reject) => {
    stream = client.uploadImage(conn.metadata(), callOptions(), (err, response) =>
      err !== null || response === undefined ? reject(err) : resolve(response),
    );
  });
  // A failure can arrive while the header or a chunk is still being written; it is awaited
  // below, so marking it handled here only keeps Node from reporting it as unhandled meanwhile.
  reply.catch(() => undefined);
  if (stream === undefined) {
    throw new Error("grpc-js did not start the upload stream");
  }
  const call = stream;
  const send = (message: UploadImageRequest): Promise<void> =>
    // write() reports back-pressure by returning false; waiting for 'drain' keeps at most one
    // chunk queued. A call the server already ended rejects through `reply` instead.
    call.write(message) ? Promise.resolve() : new Promise((resolve) => call.once("drain", resolve));
  try {
    await send({
      payload: {
        $case: "header",
        value: {
          filename: basename(path),
          contentType: "",
          dataset: header.dataset,
          label: header.label,
          tags: header.tags,
          attributes: {},
          expectedSha256: sha256,
          expectedSizeBytes: BigInt(info.size),
        },
      },
    });
    for await (const chunk of createReadStream(path, { highWaterMark: CHUNK_BYTES })) {
      await Promise.race([send({ payload: { $case: "chunk", value: chunk as Buffer } }), reply]);
    }
  } finally {
    call.end();
  }
  return reply;
}

async function upload(conn: Connection, args: string[]): Promise<unknown> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      dataset: { type: "string", default: "" },
      label: { type: "string", default: "" },
      tag: { type: "string", multiple: true, default: [] },
    },
  });
  if (positionals.length === 0) {
    throw new UsageError("upload needs at least one FILE");
  }
  const client = new StorageServiceClient(conn.address, conn.credentials);
  try {
    const images: Record<string, unknown>[] = [];
    for (const path of positionals) {
      const reply = await uploadOne(client, conn, path, {
        dataset: values.dataset,
        label: values.label,
        tags: values.tag,
      });
      images.push({ file: path, ...imageSummary(reply.image, reply.duplicate) });
    }
    return { images };
  } finally {
    client.close();
  }
}

/** Pages through every match (the contract's cursor), keeping the first page's counts. */
async function search(conn: Connection, args: string[]): Promise<unknown> {
  const { values } = parseArgs({
    args,
    options: {
      dataset: { type: "string", multiple: true, default: [] },
      label: { type: "string", multiple: true, default: [] },
      text: { type: "string", default: "" },
      "count-by": { type: "string", default: "label" },
    },
  });
  const countBy = COUNT_FIELDS[values["count-by"]];
  if (countBy === undefined) {
    throw new UsageError(`--count-by must be one of ${Object.keys(COUNT_FIELDS).join(", ")}`);
  }
  const client = new SearchServiceClient(conn.address, conn.credentials);
  try {
    const documents: ImageDocument[] = [];
    let counts: Record<string, bigint> = {};
    let totalSize = 0n;
    let pageToken = "";
    do {
      const request: SearchImagesRequest = {
        filter: {
          datasets: values.dataset,
          labels: values.label,
          tags: [],
          attributes: {},
          createTime: undefined,
          prediction: undefined,
          names: [],
        },
        text: values.text,
        orderBy: "",
        pageSize: PAGE_SIZE,
        pageToken,
        // Counts cover the whole match, so only the first page asks for them.
        countBy: pageToken === "" ? countBy : CountField.COUNT_FIELD_UNSPECIFIED,
      };
      const reply = await unary<SearchImagesResponse>((done) =>
        client.searchImages(request, conn.metadata(), callOptions(), done),
      );
      if (pageToken === "") {
        totalSize = reply.totalSize;
        counts = Object.fromEntries(reply.counts.map((c) => [c.value, c.count]));
      }
      documents.push(...reply.documents);
      pageToken = reply.nextPageToken;
    } while (pageToken !== "");
    return {
      totalSize,
      counts,
      documents: documents.map((d) => ({
        name: d.name,
        filename: d.filename,
        dataset: d.dataset,
        label: d.label,
        tags: d.tags,
        width: d.width,
        height: d.height,
        predictions: d.predictions.map((p) => ({
          modelVersion: p.modelVersion,
          topClass: p.topClass,
          confidence: p.confidence,
        })),
      })),
    };
  } finally {
    client.close();
  }
}

async function classify(conn: Connection, args: string[]): Promise<unknown> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      "top-k": { type: "string", default: "0" },
      "model-version": { type: "string", default: "" },
    },
  });
  const [path, ...rest] = positionals;
  if (path === undefined || rest.length > 0) {
    throw new UsageError("classify needs exactly one FILE");
  }
  const topK = Number(values["top-k"]);
  if (!Number.isInteger(topK) || topK < 0) {
    throw new UsageError("--top-k must be a whole number (0 means the server's default)");
  }
  const content = await readFile(path);
  const client = new InferenceServiceClient(conn.address, conn.credentials);
  try {
    const reply = await unary<ClassifyResponse>((done) =>
      client.classify(
        {
          image: { $case: "content", value: content },
          modelVersion: values["model-version"],
          topK,
          includeProbabilities: false,
          persist: false,
        },
        conn.metadata(),
        callOptions(),
        done,
      ),
    );
    return {
      file: path,
      modelVersion: reply.modelVersion,
      topClasses: reply.topClasses.map((c) => ({ className: c.className, probability: c.probability })),
      batchSize: reply.batchSize,
    };
  } finally {
    client.close();
  }
}

const COMMANDS: Record<string, (conn: Connection, args: string[]) => Promise<unknown>> = {
  upload,
  search,
  classify,
};

const USAGE = `usage: imagemesh-ts [--address HOST:PORT] [--token T] [--tls [--ca FILE]] COMMAND ...
  upload FILE... [--dataset D] [--label L] [--tag T]...
  search [--dataset D]... [--label L]... [--text T] [--count-by label|predicted-class|dataset]
  classify FILE [--top-k N] [--model-version V]`;

const GLOBAL_OPTIONS = {
  address: { type: "string", default: "127.0.0.1:50050" },
  token: { type: "string", default: process.env["IMAGEMESH_AUTH_TOKEN"] ?? "" },
  tls: { type: "boolean", default: false },
  ca: { type: "string" },
} as const;

/** Splits the global options (before the command) from the command and its own arguments. */
function connect(argv: string[]): { conn: Connection; command: string; rest: string[] } {
  // The first positional is the command; options before it are global, those after it its own.
  const { tokens } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: false,
    tokens: true,
    options: GLOBAL_OPTIONS,
  });
  const first = tokens.find((t) => t.kind === "positional");
  if (first === undefined) {
    throw new UsageError(USAGE);
  }
  const parsed = parseArgs({ args: argv.slice(0, first.index), options: GLOBAL_OPTIONS }).values;
  const credentials =
    parsed.tls || parsed.ca !== undefined
      ? ChannelCredentials.createSsl(parsed.ca === undefined ? null : readFileSync(parsed.ca))
      : ChannelCredentials.createInsecure();
  const token = parsed.token;
  return {
    conn: {
      address: parsed.address,
      credentials,
      // Per-call metadata rather than call credentials: grpc-js refuses to compose call
      // credentials with an insecure channel, and loopback deployments run plaintext.
      metadata: () => {
        const md = new Metadata();
        if (token !== "") {
          md.set("authorization", `Bearer ${token}`);
        }
        return md;
      },
    },
    command: first.value,
    rest: argv.slice(first.index + 1),
  };
}

/** JSON with int64 fields (bigint) as numbers when exact, else as decimal strings. */
function toJson(value: unknown, indent = 2): string {
  return JSON.stringify(
    value,
    (_key, v: unknown) =>
      typeof v === "bigint" ? (BigInt(Number(v)) === v ? Number(v) : v.toString()) : v,
    indent,
  );
}

async function main(argv: string[]): Promise<number> {
  try {
    const { conn, command, rest } = connect(argv);
    const run = COMMANDS[command];
    if (run === undefined) {
      throw new UsageError(`unknown command "${command}"\n${USAGE}`);
    }
    process.stdout.write(toJson(await run(conn, rest)) + "\n");
    return 0;
  } catch (err) {
    if (err instanceof UsageError || (err instanceof TypeError && "code" in err)) {
      // parseArgs reports unknown or malformed options as a TypeError with an ERR_PARSE_ARGS code.
      process.stderr.write(`imagemesh-ts: ${err.message}\n`);
      return 2;
    }
    if (isServiceError(err)) {
      const code = status[err.code] ?? String(err.code);
      process.stderr.write(toJson({ error: { code, codeNumber: err.code, message: err.details } }, 0) + "\n");
      return 1;
    }
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(toJson({ error: { code: "CLIENT", message } }, 0) + "\n");
    return 1;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});

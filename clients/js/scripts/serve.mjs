// `npm run demo`: serves clients/js (the built module and the examples) on 127.0.0.1, so the
// presence board at /examples/presence-board/ can import /dist/reach.js. Usage:
//   node scripts/serve.mjs [port]      (default 8765; 0 picks a free one)

import { createReadStream, existsSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json",
  ".png": "image/png",
  ".svg": "image/svg+xml",
};

/** Serves `root` on 127.0.0.1:`port`; resolves with the server once it listens. */
export function serve(port = 8765) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://localhost").pathname);
    let file = normalize(join(root, path));
    if (file !== root && !file.startsWith(root + sep)) {
      res.writeHead(403).end("forbidden\n");
      return;
    }
    if (existsSync(file) && statSync(file).isDirectory()) file = join(file, "index.html");
    if (!existsSync(file)) {
      res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
      return;
    }
    res.writeHead(200, {
      "Content-Type": TYPES[extname(file)] ?? "application/octet-stream",
      "Cache-Control": "no-store",
    });
    createReadStream(file).pipe(res);
  });
  return new Promise((listening, fail) => {
    server.once("error", fail);
    server.listen(port, "127.0.0.1", () => listening(server));
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (!existsSync(join(root, "dist", "reach.js"))) {
    console.error("dist/reach.js is missing: run `npm run build` first");
    process.exit(1);
  }
  const server = await serve(Number(process.argv[2] ?? 8765));
  const { port } = server.address();
  console.log(`presence board: http://127.0.0.1:${port}/examples/presence-board/`);
  console.log("Ctrl-C stops it.");
}

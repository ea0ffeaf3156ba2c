#!/usr/bin/env node
// The transformers.js-family encoder (@lenml/tokenizers, installed in tools/npm by
// scripts/setup.sh) run as an oracle for our tokenizer tests and benchmark. Never needed at run time.
//
//   node tools/tokenizer_oracle.js --tokenizer deepseek_v3|qwen3|llama3|PATH/tokenizer.json
//        [--json] [--input FILE] [--output FILE]
//
// Plain mode: UTF-8 text on stdin → ids separated by spaces on stdout.
// --json: a JSON array of strings in → {"ids": [[...], ...], "encode_seconds": s, "bytes": n} out,
// where encode_seconds times only the encoding loop (not node start-up or loading).
// Special tokens are matched in the text; nothing (no BOS) is added around it.
"use strict";
const fs = require("fs");
const path = require("path");

const modules = path.join(__dirname, "npm", "node_modules");
if (!fs.existsSync(path.join(modules, "@lenml", "tokenizers"))) {
  console.error("tokenizer_oracle: " + modules + " lacks @lenml/tokenizers; run scripts/setup.sh --deps");
  process.exit(3);
}

const args = process.argv.slice(2);
const opt = { json: false };
for (let i = 0; i < args.length; ++i) {
  const a = args[i];
  if (a === "--json") opt.json = true;
  else if (a === "--tokenizer" || a === "--input" || a === "--output") opt[a.slice(2)] = args[++i];
  else {
    console.error("tokenizer_oracle: unknown argument " + a);
    process.exit(2);
  }
}
if (!opt.tokenizer) {
  console.error("tokenizer_oracle: --tokenizer is required");
  process.exit(2);
}

function load(name) {
  if (/^[a-z0-9_]+$/.test(name)) {
    return require(path.join(modules, "@lenml", "tokenizer-" + name)).fromPreTrained();
  }
  // Any tokenizer.json (ours included) through the generic class, whatever tokenizer_class says.
  const { tokenizers } = require(path.join(modules, "@lenml", "tokenizers"));
  const file = fs.statSync(name).isDirectory() ? path.join(name, "tokenizer.json") : name;
  const cfgFile = path.join(path.dirname(file), "tokenizer_config.json");
  const tokenizerJSON = JSON.parse(fs.readFileSync(file, "utf8"));
  const tokenizerConfig = fs.existsSync(cfgFile) ? JSON.parse(fs.readFileSync(cfgFile, "utf8")) : {};
  return new tokenizers.PreTrainedTokenizer(tokenizerJSON, tokenizerConfig);
}

const tok = load(opt.tokenizer);
const input = fs.readFileSync(opt.input ?? 0, "utf8");
let out;
if (opt.json) {
  const texts = JSON.parse(input);
  let bytes = 0;
  for (const t of texts) bytes += Buffer.byteLength(t, "utf8");
  const t0 = process.hrtime.bigint();
  const ids = texts.map((t) => tok.encode(t, { add_special_tokens: false }));
  const t1 = process.hrtime.bigint();
  out = JSON.stringify({ ids, encode_seconds: Number(t1 - t0) / 1e9, bytes });
} else {
  out = tok.encode(input, { add_special_tokens: false }).join(" ");
}
if (opt.output) fs.writeFileSync(opt.output, out + "\n");
else process.stdout.write(out + "\n");

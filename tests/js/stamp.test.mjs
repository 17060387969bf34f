// decodeStamp: the 24-block capture-time stamp the agent writes into video frames (frontend/console/video.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { STAMP_LAYOUT, STAMP_MODULO, decodeStamp, encodeStamp, stampBlock, stampLatencyMs } from "../../frontend/console/video.js";

function frame(width, height, fill = 90) {
  const data = new Uint8ClampedArray(width * height * 4).fill(fill);
  for (let i = 3; i < data.length; i += 4) data[i] = 255;
  return { data, width, height };
}

test("the layout lives in one constant: 24 blocks from (0, 0), 8 px unless the frame is narrower than 192 px", () => {
  assert.equal(STAMP_LAYOUT.bits, 24);
  assert.deepEqual([STAMP_LAYOUT.x0, STAMP_LAYOUT.y0], [0, 0]);
  assert.equal(STAMP_MODULO, 2 ** 24);
  // robots/agent/media.py stamp_block: max(1, min(8, width // 24))
  assert.deepEqual([224, 192, 191, 128, 64, 20].map((w) => stampBlock(w)), [8, 8, 7, 5, 2, 1]);
});

test("round trip: encoded values decode exactly, MSB first", () => {
  for (const value of [0, 1, 2, 0x800000, 0xffffff, 0xabcdef, Date.now() % STAMP_MODULO]) {
    const img = frame(224, 224);
    encodeStamp(img.data, img.width, value);
    assert.equal(decodeStamp(img, img.width), value);
    assert.equal(decodeStamp(img.data, img.width), value, "raw RGBA with an explicit width");
  }
});

test("bit order: the leftmost block is the most significant bit", () => {
  const img = frame(192, 8, 0);
  for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) { const p = 4 * (y * 192 + x); img.data[p] = img.data[p + 1] = img.data[p + 2] = 255; }
  assert.equal(decodeStamp(img, 192), 0x800000);
});

test("bit = mean luminance > 128, tolerant of codec noise at block edges", () => {
  const img = frame(224, 16);
  const value = 0x5a5a5a;
  encodeStamp(img.data, img.width, value);
  // smear: grey borders and noise inside each block, like a lossy codec
  for (let y = 0; y < 8; y++) {
    for (let x = 0; x < 192; x++) {
      const p = 4 * (y * 224 + x);
      const edge = x % 8 === 0 || x % 8 === 7 || y === 0 || y === 7;
      const v = img.data[p];
      const noisy = edge ? 128 : Math.max(0, Math.min(255, v + (v ? -40 : 40)));
      img.data[p] = noisy;
      img.data[p + 1] = noisy;
      img.data[p + 2] = noisy;
    }
  }
  assert.equal(decodeStamp(img, 224), value);
});

test("small frames use smaller blocks, as the agent does (64 px wide: 2 px blocks, whole block read)", () => {
  for (const width of [64, 96, 128, 160]) {
    const img = frame(width, 16);
    encodeStamp(img.data, width, 0xc0ffee);
    assert.equal(decodeStamp(img, width), 0xc0ffee, `width ${width}`);
  }
});

test("no stamp: a grey scene decodes to null (strict), a frame too short for a block row to null", () => {
  assert.equal(decodeStamp(frame(224, 224, 128), 224), null);
  assert.equal(decodeStamp(frame(224, 4), 224), null, "8 px blocks need 8 rows");
  assert.equal(typeof decodeStamp(frame(224, 224, 128), 224, STAMP_LAYOUT, { strict: false }), "number");
});

test("a different layout (e.g. the agent scaling blocks) is one argument away", () => {
  const layout = { ...STAMP_LAYOUT, block: 4, y0: 2 };
  const img = frame(128, 8);
  encodeStamp(img.data, img.width, 123456, layout);
  assert.equal(decodeStamp(img, 128, layout), 123456);
});

test("latency wraps around 2^24 and rejects implausible values", () => {
  assert.equal(stampLatencyMs(1000, 1080), 80);
  assert.equal(stampLatencyMs(STAMP_MODULO - 10, STAMP_MODULO + 40), 50, "the clock wrapped after capture");
  const now = 1_700_000_000_123;
  assert.equal(stampLatencyMs((now - 95) % STAMP_MODULO, now), 95);
  assert.equal(stampLatencyMs(null, now), null);
  assert.equal(stampLatencyMs((now + 5000) % STAMP_MODULO, now), null, "a stamp from the future is a clock error");
});

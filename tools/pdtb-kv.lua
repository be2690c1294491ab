-- Wireshark dissectors for the pdtb KV handoff protocol (docs/wire-format.md): "pdkv" over TCP
-- and "pdsr", the SRD-like reliable datagrams over UDP (one datagram per UDP packet).
-- Use: wireshark -X lua_script:tools/pdtb-kv.lua, or copy it to your personal plugins folder.
-- Registered on TCP and UDP port 7470; other ports: "Decode As..." or tshark -d tcp.port==PORT,pdkv
-- / -d udp.port==PORT,pdsr.
-- Frames are reassembled across TCP segments (dissect_tcp_pdus); with a snaplen-truncated capture
-- Wireshark shows the frames it can and marks the rest as unreassembled.

local pdkv = Proto("pdkv", "pdtb KV handoff")

local frame_types = { [1] = "HELLO", [2] = "AUTH", [3] = "AUTH_OK", [4] = "BEGIN",
                      [5] = "CHUNK", [6] = "END", [7] = "ACK" }
local codes = { [0] = "OK", [1] = "BAD_MAGIC", [2] = "BAD_VERSION", [3] = "BAD_TYPE", [4] = "OVERSIZED",
                [5] = "TRUNCATED", [6] = "MALFORMED", [7] = "AUTH_FAILED", [8] = "OUT_OF_ORDER",
                [9] = "BAD_CRC", [10] = "BAD_PAYLOAD", [11] = "BAD_CHECKSUM", [12] = "TIMEOUT",
                [13] = "REFUSED", [14] = "KV_FULL" }

local f = {
  magic = ProtoField.string("pdkv.magic", "Magic"),
  version = ProtoField.uint8("pdkv.version", "Version"),
  type = ProtoField.uint8("pdkv.type", "Type", base.DEC, frame_types),
  flags = ProtoField.uint16("pdkv.flags", "Flags", base.HEX),
  length = ProtoField.uint32("pdkv.length", "Body length"),
  nonce = ProtoField.bytes("pdkv.nonce", "Nonce"),
  mac = ProtoField.bytes("pdkv.mac", "HMAC-SHA256"),
  layers = ProtoField.uint16("pdkv.layers", "Layers"),
  tokens = ProtoField.uint32("pdkv.tokens", "Tokens"),
  total_bytes = ProtoField.uint64("pdkv.total_bytes", "Total bytes"),
  request_id = ProtoField.string("pdkv.request_id", "Request id"),
  model = ProtoField.string("pdkv.model", "Model"),
  layout = ProtoField.string("pdkv.layout", "Layout"),
  layer = ProtoField.uint16("pdkv.layer", "Layer"),
  offset = ProtoField.uint64("pdkv.offset", "Offset"),
  payload_len = ProtoField.uint32("pdkv.payload_len", "Payload length"),
  crc32 = ProtoField.uint32("pdkv.crc32", "Payload CRC-32", base.HEX),
  payload = ProtoField.bytes("pdkv.payload", "Payload"),
  chunks = ProtoField.uint32("pdkv.chunks", "Chunks"),
  checksum = ProtoField.uint32("pdkv.checksum", "Transfer checksum", base.HEX),
  verified = ProtoField.bool("pdkv.verified", "Verified"),
  code = ProtoField.uint16("pdkv.code", "Code", base.DEC, codes),
  bytes_verified = ProtoField.uint64("pdkv.bytes_verified", "Bytes verified"),
  reason = ProtoField.string("pdkv.reason", "Reason"),
  stripe = ProtoField.uint8("pdkv.stripe", "Stripe"),
  stripes = ProtoField.uint8("pdkv.stripes", "Stripes"),
  attempt = ProtoField.uint32("pdkv.attempt", "Attempt", base.HEX),
}
pdkv.fields = f

local HEADER_LEN = 12

-- a u8-length-prefixed string at off; returns the offset after it
local function str8(tree, field, tvb, off)
  local n = tvb(off, 1):uint()
  tree:add(field, tvb(off + 1, n))
  return off + 1 + n
end

local function dissect_body(ftype, tvb, tree, off)
  if ftype == 1 then
    tree:add(f.nonce, tvb(off, 32))
  elseif ftype == 2 then
    tree:add(f.nonce, tvb(off, 32)); tree:add(f.mac, tvb(off + 32, 32))
  elseif ftype == 3 then
    tree:add(f.mac, tvb(off, 32))
  elseif ftype == 4 then
    tree:add(f.layers, tvb(off, 2)); tree:add(f.tokens, tvb(off + 2, 4)); tree:add(f.total_bytes, tvb(off + 6, 8))
    off = str8(tree, f.request_id, tvb, off + 14)
    off = str8(tree, f.model, tvb, off)
    off = str8(tree, f.layout, tvb, off)
    -- a striped transfer's BEGIN (one per connection): stripe, stripes, attempt
    if tvb:len() - off == 6 then
      tree:add(f.stripe, tvb(off, 1)); tree:add(f.stripes, tvb(off + 1, 1)); tree:add(f.attempt, tvb(off + 2, 4))
    end
  elseif ftype == 5 then
    off = str8(tree, f.request_id, tvb, off)
    tree:add(f.layer, tvb(off, 2)); tree:add(f.offset, tvb(off + 2, 8))
    local n = tvb(off + 10, 4):uint()
    tree:add(f.payload_len, tvb(off + 10, 4)); tree:add(f.crc32, tvb(off + 14, 4))
    if n > 0 then tree:add(f.payload, tvb(off + 18, n)) end
  elseif ftype == 6 then
    off = str8(tree, f.request_id, tvb, off)
    tree:add(f.total_bytes, tvb(off, 8)); tree:add(f.chunks, tvb(off + 8, 4)); tree:add(f.checksum, tvb(off + 12, 4))
  elseif ftype == 7 then
    off = str8(tree, f.request_id, tvb, off)
    tree:add(f.verified, tvb(off, 1)); tree:add(f.code, tvb(off + 1, 2)); tree:add(f.bytes_verified, tvb(off + 3, 8))
    local n = tvb(off + 11, 2):uint()
    if n > 0 then tree:add(f.reason, tvb(off + 13, n)) end
  end
end

local function frame_len(tvb, pinfo, off)
  return HEADER_LEN + tvb(off + 8, 4):uint()
end

local function dissect_frame(tvb, pinfo, tree)
  pinfo.cols.protocol = "PDKV"
  local ftype = tvb(5, 1):uint()
  local name = frame_types[ftype] or ("type " .. ftype)
  local sub = tree:add(pdkv, tvb(), "PDKV " .. name)
  sub:add(f.magic, tvb(0, 4)); sub:add(f.version, tvb(4, 1)); sub:add(f.type, tvb(5, 1))
  sub:add(f.flags, tvb(6, 2)); sub:add(f.length, tvb(8, 4))
  if tvb(0, 4):string() ~= "PDKV" then
    sub:add_expert_info(PI_MALFORMED, PI_ERROR, "bad magic")
    return tvb:len()
  end
  dissect_body(ftype, tvb, sub, HEADER_LEN)
  local info = tostring(pinfo.cols.info)
  if not info:find("PDKV", 1, true) then pinfo.cols.info:set("PDKV " .. name) else pinfo.cols.info:append(", " .. name) end
  return tvb:len()
end

function pdkv.dissector(tvb, pinfo, tree)
  if tvb:len() < tvb:reported_length_remaining() then
    -- snaplen-truncated segment: no reassembly possible; show a frame only where one starts here
    if tvb:len() >= HEADER_LEN and tvb(0, 4):string() == "PDKV" then
      pcall(dissect_frame, tvb, pinfo, tree)
    else
      pinfo.cols.protocol = "PDKV"
      pinfo.cols.info:set("PDKV continuation (truncated capture)")
    end
    return tvb:len()
  end
  dissect_tcp_pdus(tvb, tree, HEADER_LEN, frame_len, dissect_frame, true)
  return tvb:len()
end

DissectorTable.get("tcp.port"):add(7470, pdkv)

-- ---------------------------------------------------------------- SRD-like datagrams

local pdsr = Proto("pdsr", "pdtb KV handoff, SRD-like datagrams")
local srd_types = { [1] = "REQ", [2] = "HELLO", [3] = "BEGIN", [4] = "GRANT", [5] = "DATA", [6] = "SACK",
                    [7] = "END", [8] = "ACK" }
local s = {
  magic = ProtoField.string("pdsr.magic", "Magic"),
  version = ProtoField.uint8("pdsr.version", "Version"),
  type = ProtoField.uint8("pdsr.type", "Type", base.DEC, srd_types),
  flags = ProtoField.uint16("pdsr.flags", "Flags", base.HEX),
  retransmit = ProtoField.bool("pdsr.retransmit", "Retransmission", 16, nil, 0x0001),
  session = ProtoField.uint64("pdsr.session", "Session", base.HEX),
  nonce = ProtoField.bytes("pdsr.nonce", "Nonce"),
  mac = ProtoField.bytes("pdsr.mac", "HMAC-SHA256"),
  packet_bytes = ProtoField.uint32("pdsr.packet_bytes", "Payload bytes per packet"),
  layers = ProtoField.uint16("pdsr.layers", "Layers"),
  tokens = ProtoField.uint32("pdsr.tokens", "Tokens"),
  total_bytes = ProtoField.uint64("pdsr.total_bytes", "Total bytes"),
  request_id = ProtoField.string("pdsr.request_id", "Request id"),
  model = ProtoField.string("pdsr.model", "Model"),
  layout = ProtoField.string("pdsr.layout", "Layout"),
  rate = ProtoField.uint64("pdsr.rate_bps", "Receiver rate (bit/s)"),
  psn = ProtoField.uint32("pdsr.psn", "Packet number"),
  tsval = ProtoField.uint32("pdsr.tsval", "Sender timestamp (us)"),
  layer = ProtoField.uint16("pdsr.layer", "Layer"),
  offset = ProtoField.uint64("pdsr.offset", "Offset"),
  crc32 = ProtoField.uint32("pdsr.crc32", "Payload CRC-32", base.HEX),
  payload_len = ProtoField.uint32("pdsr.payload_len", "Payload length"),
  payload = ProtoField.bytes("pdsr.payload", "Payload"),
  cum = ProtoField.uint32("pdsr.cum", "Cumulative (all packets below received)"),
  tsecr = ProtoField.uint32("pdsr.tsecr", "Echoed timestamp (us)"),
  bitmap_len = ProtoField.uint16("pdsr.bitmap_len", "Bitmap bytes"),
  bitmap = ProtoField.bytes("pdsr.bitmap", "Received bitmap (from cum)"),
  packets = ProtoField.uint32("pdsr.packets", "Packets"),
  checksum = ProtoField.uint32("pdsr.checksum", "Transfer checksum", base.HEX),
  verified = ProtoField.bool("pdsr.verified", "Verified"),
  code = ProtoField.uint16("pdsr.code", "Code", base.DEC, codes),
  bytes_verified = ProtoField.uint64("pdsr.bytes_verified", "Bytes verified"),
  reason = ProtoField.string("pdsr.reason", "Reason"),
  tag = ProtoField.bytes("pdsr.tag", "Tag (HMAC-SHA256/64)"),
}
pdsr.fields = s

local SRD_COMMON = 16
local SRD_DATA_HEADER = 46

function pdsr.dissector(tvb, pinfo, tree)
  if tvb:len() < SRD_COMMON or tvb(0, 4):string() ~= "PDSR" then return 0 end
  pinfo.cols.protocol = "PDSR"
  local ftype = tvb(5, 1):uint()
  local name = srd_types[ftype] or ("type " .. ftype)
  local sub = tree:add(pdsr, tvb(), "PDSR " .. name)
  sub:add(s.magic, tvb(0, 4)); sub:add(s.version, tvb(4, 1)); sub:add(s.type, tvb(5, 1))
  local fl = sub:add(s.flags, tvb(6, 2)); fl:add(s.retransmit, tvb(6, 2))
  sub:add(s.session, tvb(8, 8))
  local info = "PDSR " .. name
  local ok = pcall(function()
    local off = SRD_COMMON
    local n = tvb:reported_length_remaining()
    if ftype == 2 then
      sub:add(s.nonce, tvb(off, 32))
    elseif ftype == 3 then
      sub:add(s.nonce, tvb(off, 32)); sub:add(s.mac, tvb(off + 32, 32)); sub:add(s.packet_bytes, tvb(off + 64, 4))
      off = off + 68
      sub:add(s.layers, tvb(off, 2)); sub:add(s.tokens, tvb(off + 2, 4)); sub:add(s.total_bytes, tvb(off + 6, 8))
      off = str8(sub, s.request_id, tvb, off + 14)
      off = str8(sub, s.model, tvb, off)
      off = str8(sub, s.layout, tvb, off)
      sub:add(s.tag, tvb(off, 8))
    elseif ftype == 4 then
      sub:add(s.mac, tvb(off, 32)); sub:add(s.rate, tvb(off + 32, 8)); sub:add(s.tag, tvb(off + 40, 8))
    elseif ftype == 5 then
      sub:add(s.psn, tvb(off, 4)); sub:add(s.tsval, tvb(off + 4, 4)); sub:add(s.layer, tvb(off + 8, 2))
      sub:add(s.offset, tvb(off + 10, 8)); sub:add(s.crc32, tvb(off + 18, 4)); sub:add(s.tag, tvb(off + 22, 8))
      local plen = n - SRD_DATA_HEADER
      sub:add(s.payload_len, plen)
      if tvb:len() > SRD_DATA_HEADER then sub:add(s.payload, tvb(SRD_DATA_HEADER)) end
      info = info .. " psn=" .. tvb(off, 4):uint() .. " off=" .. tostring(tvb(off + 10, 8):uint64())
      if bit.band(tvb(6, 2):uint(), 1) == 1 then info = info .. " [retransmission]" end
    elseif ftype == 6 then
      sub:add(s.cum, tvb(off, 4)); sub:add(s.tsecr, tvb(off + 4, 4))
      local bl = tvb(off + 8, 2):uint()
      sub:add(s.bitmap_len, tvb(off + 8, 2))
      if bl > 0 then sub:add(s.bitmap, tvb(off + 10, bl)) end
      sub:add(s.tag, tvb(off + 10 + bl, 8))
      info = info .. " cum=" .. tvb(off, 4):uint()
    elseif ftype == 7 then
      sub:add(s.total_bytes, tvb(off, 8)); sub:add(s.packets, tvb(off + 8, 4)); sub:add(s.checksum, tvb(off + 12, 4))
      sub:add(s.tag, tvb(off + 16, 8))
    elseif ftype == 8 then
      off = str8(sub, s.request_id, tvb, off)
      sub:add(s.verified, tvb(off, 1)); sub:add(s.code, tvb(off + 1, 2)); sub:add(s.bytes_verified, tvb(off + 3, 8))
      local rl = tvb(off + 11, 2):uint()
      if rl > 0 then sub:add(s.reason, tvb(off + 13, rl)) end
      sub:add(s.tag, tvb(off + 13 + rl, 8))
    end
  end)
  if not ok then sub:add_expert_info(PI_MALFORMED, PI_WARN, "datagram cut short (snaplen) or malformed") end
  pinfo.cols.info:set(info)
  return tvb:len()
end

DissectorTable.get("udp.port"):add(7470, pdsr)

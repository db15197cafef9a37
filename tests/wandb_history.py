"""Reading an offline W&B run file in tests (no wandb service, no network)."""
import struct


def read_wandb_history(run_file):
    """The history rows ``{key: json value}`` of an offline W&B run (a LevelDB-style log of
    protobuf records: a 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    # wandb's service process writes the file; run.finish() can return before it has: a full
    # suite once read no history row from a file that held four a moment later
    wandb.teardown()

    with open(run_file, "rb") as f:
        data = f.read()
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows

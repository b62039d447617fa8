// Package outbox is the telemetry pipeline's durable queue: a FIFO of
// device-to-cloud messages on disk that keeps each until the hub
// acknowledged it (see Outbox for what is written when and what survives
// a SIGKILL or a power cut). It knows nothing of MQTT or of the spool; the
// pipeline (package telemetry) feeds it and drains it.
//
// It imports only gwagent's atomic-file and clock leaves, never logs and
// keeps no package state. Importers: telemetry, and agent for the Options
// and Message it hands the pipeline.
package outbox

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/clock"
)

// Kind says what a queued message is, which decides what may be evicted
// when the outbox is full and whether Put must fsync it.
type Kind uint8

const (
	// KindHealth: the agent's own periodic health message. The oldest are
	// evicted first when the outbox is full; a newer one says the same. Never
	// fsynced: a power cut may lose the last ones (the next one supersedes them).
	KindHealth Kind = 1
	// KindApp: a local application's message. Never evicted: when the outbox
	// is full, Put refuses it with ErrFull and the caller keeps it
	// (a spool file stays where it is).
	KindApp Kind = 2

	// kindAck marks an ack record (never a message's kind).
	kindAck = 0x80
	// kindDelivered marks a delivered-files record: receipts (never a
	// message's kind).
	kindDelivered = 0x81
)

// Message is one queued device-to-cloud message.
type Message struct {
	// Seq orders messages; assigned by Put.
	Seq uint64
	// ID is the message id ($.mid), stable across resends so the cloud can
	// de-duplicate; assigned by Put unless set. Never reused for another
	// message, across restarts too.
	ID   string
	Kind Kind
	// System and App are the property bag (system without "$.").
	System map[string]string
	App    map[string]string
	// Local is metadata that never leaves the device: the producer's own
	// durable copy (a spool file), deleted once the hub acknowledged the
	// message. A message with Local set is not fsynced by Put: until the
	// PUBACK the producer's copy is what survives a power cut.
	Local string
	// LocalID is the version of Local the message was read from (zero if
	// unknown, as for records of an older version): only that version
	// may be removed once the message is delivered (see Receipt).
	LocalID FileID
	Body    []byte
}

// FileID identifies one version of a producer's file: a file written anew
// under the same name has another (a new inode, or a new modification
// time or size).
type FileID struct {
	Dev, Ino    uint64
	Size, Mtime int64 // Mtime in nanoseconds since the epoch
}

// Receipt says that the hub acknowledged the message read from version ID
// of the producer's file Path, which may therefore be removed. Deliver
// records receipts durably (in the same write as the acks), so their
// producer may remove its files later, in batches, and a crash in
// between sends nothing again: the receipts are found at the next Open
// (Receipts). A receipt stays on disk until Retired says the file is
// gone.
type Receipt struct {
	Path string
	ID   FileID
	seg  *segment // holds the record: kept until Retired (nil: not on disk)
}

var (
	// ErrFull: an application message does not fit even after evicting
	// every health message.
	ErrFull = errors.New("outbox full")
	// ErrClosed: the outbox was closed.
	ErrClosed = errors.New("closed")
)

// Options bound the outbox.
type Options struct {
	// MaxBytes bounds the queued messages (default 16 MiB).
	MaxBytes int64
	// SegmentBytes is the size at which a new segment file starts (default 1 MiB).
	SegmentBytes int64
	// Clock times the write-behind and stamps acks; default clock.Real.
	Clock clock.Clock
	// WriteBehind is how long a message that needs no fsync (health, or
	// with a producer's copy) may stay in memory only: one the hub
	// acknowledges sooner never touches the flash. Default 5 s; negative:
	// write every message at once.
	WriteBehind time.Duration
	// MaxPendingBytes bounds the messages held in memory (default 256 KiB);
	// past it the oldest are written out at once.
	MaxPendingBytes int64
	// noSync skips every fsync (fuzz tests, which would spend their time
	// waiting for the disk).
	noSync bool
}

// Corruption describes damaged records found in one segment on open.
type Corruption struct {
	Segment string // file name
	Skipped int    // damaged records or damaged regions skipped
	Bytes   int64  // bytes they covered
}

// Outbox is a durable FIFO of messages waiting for the hub's PUBACK.
//
// Layout under dir: segment files NNNNNNNNNNNNNNNNNNNN.seg (numbered in
// the order they were created), id (the outbox's random id) and epoch (a counter
// raised at every open). A segment is a sequence of records, each a u32
// length and a CRC-32C of the payload, then the payload: u64 seq, u8 type,
// and for a message its binary metadata and body, for an ack (type 0x80) a
// uvarint count n acknowledging seq..seq+n-1, for receipts (type 0x81,
// delivered files: see Deliver) a directory, its device and the files in
// it, each a name, inode, size and modification time.
//
// What is written when, and what survives what:
//   - Write-behind: a message that needs no fsync (health, or with Local set)
//     stays in memory for up to WriteBehind (5 s) and is written out only if
//     the hub has not acknowledged it by then, so while the hub is reachable
//     the outbox writes nothing at all. A SIGKILL can lose such a message in
//     those seconds: a health message (the next one says the same) or a
//     spool message (its spool file is still there and is queued again).
//   - Every Put that is written and every Ack of a written message is
//     written to the kernel (one pwrite) before the call returns, never held
//     in a user-space buffer: after a SIGKILL at any moment nothing acked is
//     sent again except what was in flight.
//   - Acks are records appended to the active segment, so at one message a
//     second messages and acks fill the same 4 KiB pages instead of each
//     dirtying a page of its own; nothing is rewritten in place.
//   - fsync (fdatasync) runs only for messages that have no other durable
//     copy: KindApp messages without Local. Concurrent Puts share it (group
//     commit). A spool message's durable copy is its spool file, deleted only
//     after the hub's PUBACK, so a power cut can lose it from the outbox but
//     not from the gateway: the spool is scanned again at start. A power cut
//     may lose the last ~30 s of health messages and acks (the kernel's
//     writeback delay); lost acks mean duplicates, never loss.
//   - Message ids are id-epoch.n; the epoch is raised (and fsynced) at open,
//     so ids never repeat across restarts. A damaged or missing epoch file
//     makes the outbox take a new id (see loadIdentity). On a full disk it
//     opens anyway and saves id and epoch before its first record.
//   - A damaged record is skipped and reported (Corrupted), never fatal: a
//     valid CRC over a malformed payload skips that one record, a bad CRC or
//     length skips to the next valid record.
//
// Segments are deleted oldest first once all their messages are acked or
// evicted and all their receipts retired (acks and receipts only ever
// refer to the same or older segments, so deleting a prefix never revives
// an acked message).
type Outbox struct {
	dir       string
	opts      Options
	id        string
	epoch     uint64
	idUnsaved bool   // id is new and not on disk yet
	renewed   string // why the id was renewed at open (IDRenewed)

	mu       sync.Mutex
	next     uint64
	live     []entry // sorted by seq from head; dead entries are acked or evicted
	head     int     // live[:head] are all dead
	nlive    int
	bytes    int64 // record bytes of live entries
	segs     []*segment
	segNo    uint64 // number of the newest segment file
	active   *segment
	newSeg   bool // active segment created since the last directory fsync
	dirty    bool // active segment written since the last fsync
	lastAck  uint64
	lastAckT time.Time
	closed   bool
	corrupt  []Corruption
	wbuf     []byte    // record encoding buffer, reused
	receipts []Receipt // found at open, not yet retired (Receipts)

	unsaved error // why the id and epoch are not on disk yet (Unsaved)

	pend      []uint64 // seqs of entries held in memory, oldest first
	pendBytes int64
	timer     clock.Timer // writes out pending entries when they are due

	syncMu sync.Mutex // serializes fsyncs; held without mu
	synced uint64     // highest seq known durable
	fsyncs int        // fsyncs done by Put (syncMu held); for tests and bench
}

type entry struct {
	seq  uint64
	seg  *segment // nil while held in memory (data set)
	data []byte   // the sealed record, while held in memory
	at   time.Time
	off  int64
	size int64 // record size on disk
	kind Kind
	dead bool
}

type segment struct {
	path string
	f    *os.File
	size int64
	live int
}

const (
	recHeader     = 8 // u32 length, u32 crc32c
	minPayload    = 9 // u64 seq, u8 type
	maxRecordSize = 512 << 10
	epochShift    = 40 // seq = epoch<<40 | n
	maxSeq        = 1 << 62
	maxAckRun     = 64 // longest run one ack record may cover
	maxReceipts   = 64 // most files one receipts record may name
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Open opens (creating) the outbox in dir and recovers its state.
// Damaged records do not fail the open: see Corrupted. Neither does a full
// disk: see Unsaved.
func Open(dir string, opts Options) (*Outbox, error) {
	if opts.MaxBytes == 0 {
		opts.MaxBytes = 16 << 20
	}
	if opts.SegmentBytes == 0 {
		opts.SegmentBytes = 1 << 20
	}
	opts.Clock = clock.Or(opts.Clock)
	if opts.WriteBehind == 0 {
		opts.WriteBehind = 5 * time.Second
	}
	if opts.MaxPendingBytes == 0 {
		opts.MaxPendingBytes = 256 << 10
	}
	o := &Outbox{dir: dir, opts: opts, next: 1}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		if !noSpace(err) {
			return nil, fmt.Errorf("outbox: %w", err)
		}
		// A brand-new state directory on a full disk: the outbox works
		// from memory until there is room (Unsaved).
		o.unsaved = fmt.Errorf("outbox: %w", err)
	} else if err := o.loadSegments(); err != nil {
		o.closeFiles()
		return nil, err
	}
	if err := o.loadIdentity(); err != nil {
		o.closeFiles()
		return nil, err
	}
	o.synced = o.next - 1
	return o, nil
}

func noSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// Message ids are ID-EPOCH.N. Two files make them unique: id, the outbox's
// random id, and epoch, a counter raised at every open before any id is
// handed out. The epoch file carries a checksum, so a damaged one (a
// power cut during the in-place write a full disk forces, a bad flash
// block, a zeroed or truncated file) is told from a good one. When the
// epoch cannot be trusted (damaged, or missing while the id is there),
// nothing tells which epochs were used: messages acknowledged within the
// write-behind time leave no record on disk. The outbox then takes a new
// random id, under which no id was ever handed out; only messages still
// queued from before are sent under the new id (a copy of one the hub
// already had then carries another id).

// idLen is the length of an outbox id: 12 hex digits.
const idLen = 12

// loadIdentity reads the id and the epoch, takes a new id when the epoch
// cannot be trusted, raises the epoch above every one used, and saves both
// before any id is handed out (on a full disk: see Unsaved).
func (o *Outbox) loadIdentity() error {
	idOK := false
	if b, err := readSmall(filepath.Join(o.dir, "id")); err == nil {
		if id := strings.TrimSpace(string(b)); validID(id) {
			o.id, idOK = id, true
		}
	}
	epoch, trusted := readEpoch(filepath.Join(o.dir, "epoch"))
	switch {
	case !idOK:
		o.newID("") // a new outbox, or a damaged id: a new id either way
	case !trusted:
		o.newID("the epoch file is damaged or missing, so the message numbers used before cannot be known")
		epoch = 0
	}
	// Records that survived are numbered below every new message.
	if e := (o.next - 1) >> epochShift; e > epoch {
		epoch = e
	}
	epoch++
	if epoch >= 1<<(64-epochShift) {
		return fmt.Errorf("outbox: epoch counter exhausted; remove %s to start a new outbox", o.dir)
	}
	o.epoch = epoch
	o.next = epoch<<epochShift | 1
	if err := o.save(); err != nil && !noSpace(err) {
		return err
	}
	return nil
}

// newID takes a new random id; why, if not empty, is kept for IDRenewed.
func (o *Outbox) newID(why string) {
	raw := make([]byte, idLen/2)
	rand.Read(raw)
	o.renewed = why
	o.id = hex.EncodeToString(raw)
	o.idUnsaved = true
}

func validID(id string) bool {
	if len(id) != idLen {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil
}

// epochLine renders the epoch file: the number and a CRC-32C of it.
func epochLine(epoch uint64) []byte {
	n := strconv.FormatUint(epoch, 10)
	return []byte(fmt.Sprintf("%s %08x\n", n, crc32.Checksum([]byte(n), castagnoli)))
}

// readEpoch reads the epoch file; trusted is false if it is missing,
// unreadable or damaged. A bare number (the format before the checksum)
// is trusted once: it is rewritten with its checksum at this open.
func readEpoch(p string) (epoch uint64, trusted bool) {
	b, err := readSmall(p)
	if err != nil {
		return 0, false
	}
	fields := strings.Fields(string(b))
	if len(fields) == 0 || len(fields) > 2 {
		return 0, false
	}
	n, err := strconv.ParseUint(fields[0], 10, 64)
	if err != nil || n == 0 || fields[0] != strconv.FormatUint(n, 10) {
		return 0, false
	}
	if len(fields) == 2 && fields[1] != fmt.Sprintf("%08x", crc32.Checksum([]byte(fields[0]), castagnoli)) {
		return 0, false
	}
	return n, true
}

// save writes the id (if new) and then the epoch, before any id of this
// epoch reaches the disk. On a full disk the epoch takes the old file's
// block (a torn write there is caught by its checksum next time); if even
// that fails, or a new id cannot be saved, the outbox runs from memory:
// Unsaved says so, and save is tried again before the first record is
// written. Ids handed out meanwhile stay new: if the agent stops before
// save succeeds, the next open takes another new id.
func (o *Outbox) save() error {
	if o.unsaved != nil {
		if err := os.MkdirAll(o.dir, 0o700); err != nil {
			o.unsaved = fmt.Errorf("outbox: %w", err)
			return o.unsaved
		}
	}
	if o.idUnsaved {
		if err := o.writeFile(filepath.Join(o.dir, "id"), []byte(o.id+"\n")); err != nil {
			o.unsaved = fmt.Errorf("outbox: %w", err)
			return o.unsaved
		}
		o.idUnsaved = false
	}
	p := filepath.Join(o.dir, "epoch")
	b := epochLine(o.epoch)
	if err := o.writeFile(p, b); err != nil {
		if !noSpace(err) || atomicfile.OverwriteInPlace(p, b) != nil {
			o.unsaved = fmt.Errorf("outbox: %w", err)
			return o.unsaved
		}
	}
	o.unsaved = nil
	return nil
}

// Unsaved is the error that kept the outbox from saving its id and epoch
// at open (a full disk), or nil. While it is set, messages are held in
// memory only; the first write to disk saves them first.
func (o *Outbox) Unsaved() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.unsaved
}

// Save saves the id and epoch if Unsaved, so a state directory that had no
// room at open looks as usual once it has (the first record would save
// them anyway).
func (o *Outbox) Save() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.unsaved == nil || o.closed {
		return nil
	}
	return o.save()
}

// IDRenewed says why the outbox took a new id at open, or "" if it did
// not (or was new).
func (o *Outbox) IDRenewed() string { return o.renewed }

func (o *Outbox) writeFile(p string, b []byte) error {
	if st, err := os.Lstat(p); err == nil && st.IsDir() {
		// Nothing can be renamed over a directory; an empty one (an
		// administrator's slip) goes, a full one fails the open below.
		os.Remove(p)
	}
	if o.opts.noSync {
		return os.WriteFile(p, b, 0o600)
	}
	return atomicfile.Write(p, b, 0o600)
}

// readSmall reads a regular file of at most 64 bytes (the id and epoch
// files), refusing links and FIFOs.
func readSmall(p string) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return nil, fmt.Errorf("outbox: %s is not a regular file", p)
	}
	b := make([]byte, 64)
	n, err := io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}

func (o *Outbox) loadSegments() error {
	ents, err := os.ReadDir(o.dir)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".seg") && e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	o.next = 1
	acked := map[uint64]bool{}
	for _, n := range names {
		no, err := strconv.ParseUint(strings.TrimSuffix(n, ".seg"), 10, 64)
		if err != nil {
			continue
		}
		o.segNo = max(o.segNo, no)
		seg := &segment{path: filepath.Join(o.dir, n)}
		if err := o.load(seg, acked); err != nil {
			return err
		}
		o.segs = append(o.segs, seg)
	}
	// Records are written in seq order; a damaged disk may disagree.
	sort.SliceStable(o.live, func(i, j int) bool { return o.live[i].seq < o.live[j].seq })
	for i := range o.live {
		e := &o.live[i]
		if acked[e.seq] || (i > 0 && o.live[i-1].seq == e.seq) {
			e.dead = true
			continue
		}
		e.seg.live++
		o.nlive++
		o.bytes += e.size
	}
	o.advanceHead()
	o.reclaim()
	return nil
}

// load reads one segment's records into o.live and acked.
func (o *Outbox) load(seg *segment, acked map[uint64]bool) error {
	f, err := os.OpenFile(seg.path, os.O_RDWR|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("outbox: %w", err)
	}
	// A segment never grows past SegmentBytes plus one record; read no more
	// than twice that (a huge file here is not ours).
	limit := 2*o.opts.SegmentBytes + maxRecordSize
	size := st.Size()
	data := make([]byte, min(size, limit))
	if _, err := f.ReadAt(data, 0); err != nil && !errors.Is(err, io.EOF) {
		f.Close()
		return fmt.Errorf("outbox: read %s: %w", seg.path, err)
	}
	skipped, bad := ScanSegment(data, func(off int64, p []byte) {
		seq := binary.LittleEndian.Uint64(p)
		if seq >= o.next {
			o.next = seq + 1
		}
		switch p[8] {
		case kindAck:
			n, _ := binary.Uvarint(p[9:])
			for i := uint64(0); i < n; i++ {
				acked[seq+i] = true
			}
			return
		case kindDelivered:
			decodeReceipts(p[9:], func(path string, id FileID) {
				o.receipts = append(o.receipts, Receipt{Path: path, ID: id, seg: seg})
				seg.live++
			})
			return
		}
		o.live = append(o.live, entry{seq: seq, kind: Kind(p[8]), seg: seg, off: off, size: int64(recHeader + len(p))})
	})
	if size > limit {
		skipped++
		bad += size - limit
	}
	if skipped > 0 {
		o.corrupt = append(o.corrupt, Corruption{Segment: filepath.Base(seg.path), Skipped: skipped, Bytes: bad})
	}
	// Nothing is appended to a segment that survived a restart: new records
	// go to a new segment, so a damaged tail is left alone.
	seg.f, seg.size = f, size
	return nil
}

// ScanSegment walks the records in a segment's bytes and calls fn for each
// valid one with its offset and payload (which fn must not keep). A payload
// is valid when its CRC matches and it parses: a message's metadata is
// well formed, an ack's count is at least 1. It returns the number of
// damaged records or regions skipped and the bytes they covered. After a
// damaged region it resumes at the next offset where a valid record starts.
func ScanSegment(data []byte, fn func(off int64, payload []byte)) (skipped int, bad int64) {
	off := 0
	badFrom := -1
	// Looking for the next record after damage checks a CRC at every offset
	// whose header looks plausible; bound that work so a hostile segment
	// cannot stall the start (the rest then counts as one damaged region).
	budget := 64 << 20
	for off+recHeader <= len(data) && budget > 0 {
		n := int(binary.LittleEndian.Uint32(data[off:]))
		ok := n >= minPayload && n <= maxRecordSize && n <= len(data)-off-recHeader
		var p []byte
		if ok {
			p = data[off+recHeader : off+recHeader+n]
			t := p[8]
			ok = (t == byte(KindHealth) || t == byte(KindApp) || t == kindAck || t == kindDelivered) && binary.LittleEndian.Uint64(p) < maxSeq
		}
		if ok {
			if badFrom >= 0 {
				budget -= n
			}
			ok = crc32.Checksum(p, castagnoli) == binary.LittleEndian.Uint32(data[off+4:])
		}
		if !ok {
			if badFrom < 0 {
				badFrom = off
			}
			off++
			continue
		}
		if badFrom >= 0 {
			skipped++
			bad += int64(off - badFrom)
			badFrom = -1
		}
		if validPayload(p) {
			fn(int64(off), p)
		} else {
			skipped++
			bad += int64(recHeader + n)
		}
		off += recHeader + n
	}
	if badFrom < 0 {
		badFrom = off
	}
	if tail := len(data) - badFrom; tail > 0 && !allZero(data[badFrom:]) {
		skipped++
		bad += int64(tail)
	}
	return skipped, bad
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func validPayload(p []byte) bool {
	if len(p) < minPayload {
		return false
	}
	switch p[8] {
	case kindAck:
		n, k := binary.Uvarint(p[9:])
		return k > 0 && n >= 1 && n <= maxAckRun && 9+k == len(p) && binary.LittleEndian.Uint64(p) < maxSeq
	case kindDelivered:
		return binary.LittleEndian.Uint64(p) < maxSeq && decodeReceipts(p[9:], nil) == nil
	case byte(KindHealth), byte(KindApp):
		if binary.LittleEndian.Uint64(p) >= maxSeq {
			return false
		}
		_, err := decodeMeta(p[9:], nil)
		return err == nil
	}
	return false
}

// Corrupted lists the damaged records found when the outbox was opened.
func (o *Outbox) Corrupted() []Corruption {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]Corruption(nil), o.corrupt...)
}

// ID is the outbox's id, the prefix of message ids.
func (o *Outbox) ID() string { return o.id }

func (o *Outbox) defaultID(seq uint64) string {
	return o.id + "-" + strconv.FormatUint(seq>>epochShift, 10) + "." + strconv.FormatUint(seq&(1<<epochShift-1), 10)
}

// Put queues messages: when it returns nil, every message is written with
// its Seq and ID set, and those that need it (see Outbox) are fsynced.
// Health messages may evict older health messages to make room; an
// application message that does not fit fails with ErrFull and is
// not queued (nor are the ones after it). evicted counts health messages
// dropped to make room.
func (o *Outbox) Put(msgs ...*Message) (evicted int, err error) {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return 0, fmt.Errorf("outbox: %w", ErrClosed)
	}
	var mustSync uint64
	defer func() {
		if mustSync != 0 {
			if serr := o.syncTo(mustSync); err == nil {
				err = serr
			}
		}
	}()
	for _, m := range msgs {
		need, err := o.encode(m)
		if err != nil {
			o.mu.Unlock()
			return evicted, err
		}
		for o.bytes+need > o.opts.MaxBytes {
			if !o.evictHealth() {
				break
			}
			evicted++
		}
		if o.bytes+need > o.opts.MaxBytes {
			if m.Kind == KindHealth {
				evicted++          // no room even after evicting: this health message goes too
				o.next = m.Seq + 1 // its id was handed out: never again
				continue
			}
			o.mu.Unlock()
			return evicted, fmt.Errorf("outbox: %w (%d bytes queued, limit %d): the hub has been unreachable for long; the message stays with its producer", ErrFull, o.bytes, o.opts.MaxBytes)
		}
		durable := m.Kind == KindApp && m.Local == ""
		if durable || o.opts.WriteBehind < 0 {
			// Written now; anything older held in memory goes first.
			if err := o.writeOut(len(o.pend)); err != nil {
				o.mu.Unlock()
				return evicted, err
			}
			off, seg, err := o.appendRecord(o.wbuf)
			if err != nil {
				o.mu.Unlock()
				return evicted, err
			}
			o.live = append(o.live, entry{seq: m.Seq, kind: m.Kind, seg: seg, off: off, size: need})
			seg.live++
		} else {
			o.live = append(o.live, entry{seq: m.Seq, kind: m.Kind, data: append([]byte(nil), o.wbuf...), at: o.opts.Clock.Now(), size: need})
			o.pend = append(o.pend, m.Seq)
			o.pendBytes += need
			if o.pendBytes > o.opts.MaxPendingBytes {
				if err := o.writeOut(len(o.pend) - 1); err != nil {
					// Memory stays bounded: this message is not queued
					// after all (its producer keeps it), and the older
					// ones wait in memory for the next write.
					o.live = o.live[:len(o.live)-1]
					o.pend = o.pend[:len(o.pend)-1]
					o.pendBytes -= need
					if len(o.pend) == 0 {
						o.pend = nil
					}
					o.arm()
					o.mu.Unlock()
					return evicted, err
				}
			}
			o.arm()
		}
		o.nlive++
		o.bytes += need
		o.next = m.Seq + 1
		if cap(o.wbuf) > 64<<10 {
			o.wbuf = nil // a rare big message; do not keep its buffer
		}
		if durable {
			mustSync = m.Seq
		}
	}
	o.mu.Unlock()
	return evicted, nil
}

// encode assigns Seq and ID and renders the record into o.wbuf, returning
// its size.
func (o *Outbox) encode(m *Message) (int64, error) {
	if m.Kind != KindHealth && m.Kind != KindApp {
		return 0, fmt.Errorf("outbox: message kind %d is neither health nor application", m.Kind)
	}
	m.Seq = o.next
	storedID := m.ID
	if m.ID == "" {
		m.ID = o.defaultID(m.Seq)
	}
	b := append(o.wbuf[:0], make([]byte, recHeader)...)
	b = binary.LittleEndian.AppendUint64(b, m.Seq)
	b = append(b, byte(m.Kind))
	b = appendMeta(b, storedID, localField(m.Local, m.LocalID), m.System, m.App)
	b = append(b, m.Body...)
	o.wbuf = b
	n := len(b) - recHeader
	if n > maxRecordSize {
		return 0, fmt.Errorf("outbox: message of %d bytes exceeds %d; IoT Hub accepts at most 256 KB", len(m.Body), maxRecordSize)
	}
	seal(b)
	return int64(len(b)), nil
}

func seal(rec []byte) {
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)-recHeader))
	binary.LittleEndian.PutUint32(rec[4:], crc32.Checksum(rec[recHeader:], castagnoli))
}

// appendMeta renders a message's metadata: uvarint-prefixed id and local,
// then the system and application properties as a uvarint count of
// uvarint-prefixed key/value pairs. An empty id means the default one.
func appendMeta(b []byte, id, local string, sys, app map[string]string) []byte {
	b = appendString(b, id)
	b = appendString(b, local)
	for _, props := range []map[string]string{sys, app} {
		b = binary.AppendUvarint(b, uint64(len(props)))
		for k, v := range props {
			b = appendString(b, k)
			b = appendString(b, v)
		}
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// decodeMeta parses metadata; with m nil it only validates. It returns the
// length of the metadata (the body follows).
func decodeMeta(p []byte, m *Message) (int, error) {
	off := 0
	str := func() (string, bool) {
		n, k := binary.Uvarint(p[off:])
		if k <= 0 || n > uint64(len(p)-off-k) {
			return "", false
		}
		off += k
		s := p[off : off+int(n)]
		off += int(n)
		if m == nil {
			return "", true
		}
		return string(s), true
	}
	var ok bool
	var id, local string
	if id, ok = str(); !ok {
		return 0, errors.New("bad id")
	}
	if local, ok = str(); !ok {
		return 0, errors.New("bad local")
	}
	var props [2]map[string]string
	for i := range props {
		n, k := binary.Uvarint(p[off:])
		if k <= 0 || n > uint64(len(p)-off) {
			return 0, errors.New("bad property count")
		}
		off += k
		if m != nil && n > 0 {
			props[i] = make(map[string]string, n)
		}
		for j := uint64(0); j < n; j++ {
			key, ok1 := str()
			val, ok2 := str()
			if !ok1 || !ok2 {
				return 0, errors.New("bad property")
			}
			if m != nil {
				props[i][key] = val
			}
		}
	}
	if m != nil {
		m.ID, m.System, m.App = id, props[0], props[1]
		m.Local, m.LocalID = splitLocal(local)
	}
	return off, nil
}

// fileIDLen is a FileID's size on disk: four little-endian 64-bit words.
const fileIDLen = 32

// localField is how a message's Local and LocalID are stored: the path,
// then, if the version is known, a NUL (which no path holds) and the
// FileID. A record without the NUL (an older version's) has no LocalID.
func localField(local string, id FileID) string {
	if local == "" || id == (FileID{}) {
		return local
	}
	b := make([]byte, 0, len(local)+1+fileIDLen)
	b = append(append(b, local...), 0)
	return string(appendFileID(b, id))
}

func splitLocal(s string) (string, FileID) {
	i := strings.IndexByte(s, 0)
	if i < 0 || len(s)-i-1 != fileIDLen {
		return s, FileID{}
	}
	b := []byte(s[i+1:])
	return s[:i], FileID{Dev: binary.LittleEndian.Uint64(b), Ino: binary.LittleEndian.Uint64(b[8:]),
		Size: int64(binary.LittleEndian.Uint64(b[16:])), Mtime: int64(binary.LittleEndian.Uint64(b[24:]))}
}

func appendFileID(b []byte, id FileID) []byte {
	b = binary.LittleEndian.AppendUint64(b, id.Dev)
	b = binary.LittleEndian.AppendUint64(b, id.Ino)
	b = binary.LittleEndian.AppendUint64(b, uint64(id.Size))
	return binary.LittleEndian.AppendUint64(b, uint64(id.Mtime))
}

// appendReceipts appends a sealed receipts record for files, which share
// one directory and device (at most maxReceipts of them): the directory
// and device once, then each file's name, inode, size and modification
// time.
func appendReceipts(b []byte, seq uint64, files []Receipt) []byte {
	start := len(b)
	b = append(b, make([]byte, recHeader)...)
	b = binary.LittleEndian.AppendUint64(b, seq)
	b = append(b, kindDelivered)
	b = appendString(b, filepath.Dir(files[0].Path))
	b = binary.AppendUvarint(b, files[0].ID.Dev)
	b = binary.AppendUvarint(b, uint64(len(files)))
	for _, f := range files {
		b = appendString(b, filepath.Base(f.Path))
		b = binary.AppendUvarint(b, f.ID.Ino)
		b = binary.AppendUvarint(b, uint64(f.ID.Size))
		b = binary.AppendVarint(b, f.ID.Mtime)
	}
	seal(b[start:])
	return b
}

// decodeReceipts parses a receipts record's body (after seq and type);
// with fn nil it only validates.
func decodeReceipts(p []byte, fn func(path string, id FileID)) error {
	off := 0
	uv := func() (uint64, bool) {
		v, k := binary.Uvarint(p[off:])
		if k <= 0 {
			return 0, false
		}
		off += k
		return v, true
	}
	str := func() (string, bool) {
		n, ok := uv()
		if !ok || n > uint64(len(p)-off) {
			return "", false
		}
		s := string(p[off : off+int(n)])
		off += int(n)
		return s, true
	}
	dir, ok1 := str()
	dev, ok2 := uv()
	n, ok3 := uv()
	if !ok1 || !ok2 || !ok3 || dir == "" || n < 1 || n > maxReceipts {
		return errors.New("bad receipts header")
	}
	for i := uint64(0); i < n; i++ {
		name, ok1 := str()
		ino, ok2 := uv()
		size, ok3 := uv()
		mtime, k := binary.Varint(p[off:])
		if !ok1 || !ok2 || !ok3 || k <= 0 || name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || size > 1<<62 {
			return errors.New("bad receipt")
		}
		off += k
		if fn != nil {
			fn(filepath.Join(dir, name), FileID{Dev: dev, Ino: ino, Size: int64(size), Mtime: mtime})
		}
	}
	if off != len(p) {
		return errors.New("receipts record too long")
	}
	return nil
}

// appendRecord writes a sealed record at the end of the active segment,
// starting a new one when it is full (mu held).
func (o *Outbox) appendRecord(rec []byte) (int64, *segment, error) {
	if o.unsaved != nil {
		// No record may reach the disk before its id's epoch.
		if err := o.save(); err != nil {
			return 0, nil, err
		}
	}
	if o.active == nil || o.active.size >= o.opts.SegmentBytes {
		if err := o.newSegment(); err != nil {
			return 0, nil, err
		}
	}
	s := o.active
	if _, err := s.f.WriteAt(rec, s.size); err != nil {
		// Cut a partial write off (that needs no space), so the segment
		// stays in use: abandoning it would open a new segment file at
		// every failed write while the disk is full. Only if that fails is
		// it abandoned, so nothing is appended after the damage (which the
		// next open's CRC check skips).
		if s.f.Truncate(s.size) != nil {
			o.active = nil
		}
		return 0, nil, fmt.Errorf("outbox: write: %w (is the disk full?)", err)
	}
	off := s.size
	s.size += int64(len(rec))
	o.dirty = true
	return off, s, nil
}

func (o *Outbox) newSegment() error {
	if o.active != nil && o.dirty && o.synced < o.next-1 {
		// A later fsync of only the new segment must not claim that
		// records in this one are durable.
		if err := o.fdatasync(o.active.f); err != nil {
			return fmt.Errorf("outbox: fsync: %w", err)
		}
	}
	o.segNo++
	p := filepath.Join(o.dir, fmt.Sprintf("%020d.seg", o.segNo))
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	s := &segment{path: p, f: f}
	o.segs = append(o.segs, s)
	o.active, o.dirty, o.newSeg = s, false, true
	return nil
}

func (o *Outbox) fdatasync(f *os.File) error {
	if o.opts.noSync {
		return nil
	}
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}

// syncTo makes every record up to seq durable with as few fsyncs as
// possible: a caller that finds its record already synced by another
// caller's fsync returns at once.
func (o *Outbox) syncTo(seq uint64) error {
	o.syncMu.Lock()
	defer o.syncMu.Unlock()
	if o.synced >= seq {
		return nil
	}
	o.mu.Lock()
	target := o.next - 1
	s, newSeg := o.active, o.newSeg
	o.dirty, o.newSeg = false, false
	o.mu.Unlock()
	if s != nil {
		if err := o.fdatasync(s.f); err != nil {
			return fmt.Errorf("outbox: fsync: %w", err)
		}
		if newSeg && !o.opts.noSync {
			if err := atomicfile.SyncDir(o.dir); err != nil {
				return fmt.Errorf("outbox: %w", err)
			}
		}
		o.fsyncs++
	}
	o.synced = target
	return nil
}

// writeOut writes the oldest n entries held in memory to the active
// segment, in order (mu held).
func (o *Outbox) writeOut(n int) error {
	for ; n > 0 && len(o.pend) > 0; n-- {
		i := o.find(o.pend[0])
		if i >= 0 {
			e := &o.live[i]
			off, seg, err := o.appendRecord(e.data)
			if err != nil {
				return err
			}
			o.pendBytes -= e.size
			e.seg, e.off, e.data = seg, off, nil
			seg.live++
		}
		o.pend[0] = 0
		o.pend = o.pend[1:]
	}
	if len(o.pend) == 0 {
		o.pend = nil
	}
	return nil
}

// arm makes sure the timer will write out the oldest pending entry when it
// is due (mu held).
func (o *Outbox) arm() {
	if o.timer != nil || len(o.pend) == 0 || o.closed {
		return
	}
	o.timer = o.opts.Clock.AfterFunc(o.opts.WriteBehind, o.due)
}

// due writes out what has waited WriteBehind without an ack.
func (o *Outbox) due() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.timer = nil
	if !o.closed {
		o.writeDue(o.opts.Clock.Now())
	}
}

// writeDue writes out the entries put before now-WriteBehind and arms the
// timer for the next (mu held).
func (o *Outbox) writeDue(now time.Time) {
	cutoff := now.Add(-o.opts.WriteBehind)
	n := 0
	var next time.Time
	for _, seq := range o.pend {
		if i := o.find(seq); i >= 0 {
			if o.live[i].at.After(cutoff) {
				next = o.live[i].at
				break
			}
		}
		n++
	}
	o.writeOut(n) // a failure leaves them in memory; the next Put or Close tries again
	if !next.IsZero() && o.timer == nil {
		o.timer = o.opts.Clock.AfterFunc(clock.Until(o.opts.Clock, next.Add(o.opts.WriteBehind)), o.due)
	}
}

// evictHealth drops the oldest live health message; false if there is none.
func (o *Outbox) evictHealth() bool {
	for i := o.head; i < len(o.live); i++ {
		if e := &o.live[i]; !e.dead && e.kind == KindHealth {
			o.kill(i)
			return true
		}
	}
	return false
}

// kill records live[i] as gone (acked or evicted) in memory and on disk
// (mu held). If the ack cannot be written the message is still gone from
// this run; a restart sends it again (a duplicate, never a loss).
func (o *Outbox) kill(i int) error {
	e := &o.live[i]
	if e.seg == nil { // never written: nothing to record
		e.dead, e.data = true, nil
		o.nlive--
		o.bytes -= e.size
		o.pendBytes -= e.size
		for len(o.pend) > 0 && o.find(o.pend[0]) < 0 {
			o.pend = o.pend[1:]
		}
		if len(o.pend) == 0 {
			o.pend = nil
			if o.timer != nil { // nothing left to write: no wakeup
				o.timer.Stop()
				o.timer = nil
			}
		}
		o.advanceHead()
		return nil
	}
	var rec [recHeader + minPayload + 1]byte
	binary.LittleEndian.PutUint64(rec[recHeader:], e.seq)
	rec[recHeader+8] = kindAck
	rec[recHeader+9] = 1 // uvarint count 1
	seal(rec[:])
	_, _, err := o.appendRecord(rec[:])
	o.forget(i)
	o.reclaim()
	return err
}

// forget marks a written entry dead in memory (mu held); its ack record is
// the caller's to write.
func (o *Outbox) forget(i int) {
	e := &o.live[i]
	e.dead = true
	o.nlive--
	o.bytes -= e.size
	e.seg.live--
	o.advanceHead()
}

// advanceHead skips dead entries at the front and, now and then, drops
// them from the slice so acks stay O(1) amortized (mu held).
func (o *Outbox) advanceHead() {
	for o.head < len(o.live) && o.live[o.head].dead {
		o.head++
	}
	if o.head == len(o.live) {
		o.live, o.head = o.live[:0], 0
		if cap(o.live) > 1024 {
			o.live = nil
		}
		return
	}
	if o.head >= 256 && o.head*2 >= len(o.live) {
		n := copy(o.live, o.live[o.head:])
		clear(o.live[n:])
		o.live, o.head = o.live[:n], 0
	}
}

// reclaim deletes the oldest segments while nothing in them is live; the
// active segment stays until it is full (mu held).
func (o *Outbox) reclaim() {
	for len(o.segs) > 0 {
		s := o.segs[0]
		if s.live > 0 || (s == o.active && s.size < o.opts.SegmentBytes) {
			return
		}
		if s == o.active {
			o.active = nil
		}
		s.f.Close()
		os.Remove(s.path)
		o.segs[0] = nil
		o.segs = o.segs[1:]
	}
}

// find returns the index of the live entry with seq, or -1.
func (o *Outbox) find(seq uint64) int {
	l := o.live[o.head:]
	i := sort.Search(len(l), func(i int) bool { return l[i].seq >= seq })
	if i == len(l) || l[i].seq != seq || l[i].dead {
		return -1
	}
	return o.head + i
}

// Ack removes acknowledged messages; when it returns nil their acks are
// written to the kernel (one write for the batch) and survive a crash of
// this process. Unknown (already acked) seqs are ignored.
func (o *Outbox) Ack(seqs ...uint64) error {
	_, err := o.Deliver(seqs, nil, false)
	return err
}

// Deliver acks seqs as Ack does and records receipts for the producers'
// copies of those messages (files), in the same write: when it returns
// nil, a crash of this process at any later moment finds the receipts at
// the next Open (Receipts), so the producer may remove the files later,
// in batches, and nothing is sent again. With hold, receipts are written
// only if an ack record is written anyway (they share its write): for a
// producer that removes its files at once, so that a message acked from
// memory writes nothing at all. The receipts returned are the ones to pass
// to Retired once the files are gone (each exactly once); those not on
// disk (held, or on an error) are ignored there.
func (o *Outbox) Deliver(seqs []uint64, files []Receipt, hold bool) ([]Receipt, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return files, fmt.Errorf("outbox: %w", ErrClosed)
	}
	var buf []byte
	var run, runLen uint64
	emit := func() {
		if runLen == 0 {
			return
		}
		start := len(buf)
		buf = append(buf, make([]byte, recHeader)...)
		buf = binary.LittleEndian.AppendUint64(buf, run)
		buf = append(buf, kindAck)
		buf = binary.AppendUvarint(buf, runLen)
		seal(buf[start:])
		runLen = 0
	}
	var last uint64
	for _, seq := range seqs {
		i := o.find(seq)
		if i < 0 {
			continue
		}
		last = seq
		if o.live[i].seg == nil {
			o.kill(i) // held in memory only: nothing to write
			continue
		}
		if runLen > 0 && seq == run+runLen && runLen < maxAckRun {
			runLen++
		} else {
			emit()
			run, runLen = seq, 1
		}
		o.forget(i)
	}
	emit()
	seq := max(last, o.next-1)
	for i := 0; i < len(files) && !(hold && len(buf) == 0); {
		j := i + 1
		dir := filepath.Dir(files[i].Path)
		for j < len(files) && j-i < maxReceipts && files[j].ID.Dev == files[i].ID.Dev && filepath.Dir(files[j].Path) == dir {
			j++
		}
		buf = appendReceipts(buf, seq, files[i:j])
		i = j
	}
	var err error
	if len(buf) > 0 {
		var seg *segment
		_, seg, err = o.appendRecord(buf)
		if err == nil && len(files) > 0 {
			for i := range files {
				files[i].seg = seg
			}
			seg.live += len(files)
		}
		o.reclaim()
	}
	if last != 0 {
		o.lastAck, o.lastAckT = last, o.opts.Clock.Now()
	}
	return files, err
}

// Written reports whether r's record is on disk (Deliver wrote it, or Open
// found it), so that a crash keeps it.
func (r Receipt) Written() bool { return r.seg != nil }

// Retired says that the files of receipts Deliver returned (or Receipts
// found) are gone: their records may go with their segments. Call it
// once per receipt.
func (o *Outbox) Retired(rs ...Receipt) {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, r := range rs {
		if r.seg != nil {
			r.seg.live--
			n++
		}
	}
	if n > 0 && !o.closed {
		o.reclaim()
	}
}

// Receipts returns, once, the receipts found at Open: files delivered
// before a crash or a stop that may still be in place. The caller removes
// those still of the version delivered and passes them all to Retired.
func (o *Outbox) Receipts() []Receipt {
	o.mu.Lock()
	defer o.mu.Unlock()
	r := o.receipts
	o.receipts = nil
	return r
}

// Next returns up to n live messages with Seq > after, in order, bodies read
// from memory or disk (neighbouring records in one read).
func (o *Outbox) Next(after uint64, n int) ([]*Message, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	l := o.live[o.head:]
	i := sort.Search(len(l), func(i int) bool { return l[i].seq > after })
	var out []*Message
	var run []byte // a span of one segment read at once
	var runSeg *segment
	var runOff int64
	for ; i < len(l) && len(out) < n; i++ {
		e := l[i]
		if e.dead {
			continue
		}
		var rec []byte
		switch {
		case e.data != nil:
			rec = e.data
		case e.seg == runSeg && e.off >= runOff && e.off+e.size <= runOff+int64(len(run)):
			rec = run[e.off-runOff : e.off-runOff+e.size]
		default:
			// Read from this record to the end of the last wanted record in
			// the same segment, up to 64 KiB.
			end := e.off + e.size
			for j, k := i+1, len(out)+1; j < len(l) && k < n; j++ {
				x := l[j]
				if x.dead {
					continue
				}
				if x.seg != e.seg || x.off < end || x.off+x.size-e.off > 64<<10 {
					break
				}
				end = x.off + x.size
				k++
			}
			run, runSeg, runOff = make([]byte, end-e.off), e.seg, e.off
			if _, err := e.seg.f.ReadAt(run, e.off); err != nil {
				return out, fmt.Errorf("outbox: read record %d from %s: %w", e.seq, filepath.Base(e.seg.path), err)
			}
			rec = run[:e.size]
		}
		m, err := o.decode(e.seq, rec)
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
	return out, nil
}

func (o *Outbox) decode(seq uint64, buf []byte) (*Message, error) {
	e := entry{seq: seq}
	p := buf[recHeader:]
	if crc32.Checksum(p, castagnoli) != binary.LittleEndian.Uint32(buf[4:]) || len(p) < minPayload {
		return nil, fmt.Errorf("outbox: record %d changed on disk", e.seq)
	}
	m := &Message{Seq: e.seq, Kind: Kind(p[8])}
	n, err := decodeMeta(p[9:], m)
	if err != nil {
		return nil, fmt.Errorf("outbox: corrupt record %d: %w", e.seq, err)
	}
	if m.ID == "" {
		m.ID = o.defaultID(e.seq)
	}
	m.Body = p[9+n:]
	return m, nil
}

// Depth is the number and size of queued messages.
func (o *Outbox) Depth() (messages int, bytes int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.nlive, o.bytes
}

// LastAcked is the last acknowledged message's seq and time (zero if none
// since open).
func (o *Outbox) LastAcked() (uint64, time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.lastAck, o.lastAckT
}

// Flush writes out what is held in memory and makes everything durable.
func (o *Outbox) Flush() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.flushLocked()
}

func (o *Outbox) flushLocked() error {
	if err := o.writeOut(len(o.pend)); err != nil {
		return err
	}
	if o.active != nil && o.dirty {
		o.dirty = false
		if err := o.fdatasync(o.active.f); err != nil {
			return fmt.Errorf("outbox: fsync: %w", err)
		}
	}
	if o.newSeg {
		o.newSeg = false
		if o.opts.noSync {
			return nil
		}
		return atomicfile.SyncDir(o.dir)
	}
	return nil
}

// Close flushes and closes the outbox.
func (o *Outbox) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil
	}
	err := o.flushLocked()
	o.closed = true
	if o.timer != nil {
		o.timer.Stop()
		o.timer = nil
	}
	o.closeFiles()
	return err
}

func (o *Outbox) closeFiles() {
	for _, s := range o.segs {
		if s.f != nil {
			s.f.Close()
		}
	}
}

package transport

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// Kind says what a queued message is, which decides what may be evicted
// when the outbox is full.
type Kind uint8

const (
	// KindHealth: the agent's own periodic health message. The oldest are
	// evicted first when the outbox is full; a newer one says the same.
	KindHealth Kind = 1
	// KindApp: a local application's message. Never evicted: when the outbox
	// is full, Put refuses it with ErrOutboxFull and the caller keeps it
	// (a spool file stays where it is).
	KindApp Kind = 2
)

// Message is one queued device-to-cloud message.
type Message struct {
	// Seq orders messages; assigned by Put.
	Seq uint64 `json:"-"`
	// ID is the message id ($.mid), stable across resends so the cloud can
	// de-duplicate; assigned by Put unless set.
	ID   string `json:"id"`
	Kind Kind   `json:"k"`
	// System and App are the property bag (system without "$.").
	System map[string]string `json:"s,omitempty"`
	App    map[string]string `json:"a,omitempty"`
	// Local is metadata that never leaves the device (e.g. the spool file
	// to delete once the hub acknowledged the message).
	Local string `json:"l,omitempty"`
	Body  []byte `json:"-"`
}

// ErrOutboxFull: an application message does not fit even after evicting
// every health message.
var ErrOutboxFull = errors.New("outbox full")

// OutboxOptions bound the outbox.
type OutboxOptions struct {
	// MaxBytes bounds the queued messages (default 16 MiB).
	MaxBytes int64
	// SegmentBytes is the size at which a new segment file starts (default 1 MiB).
	SegmentBytes int64
	// Now is the clock (tests).
	Now func() time.Time
}

// Outbox is a durable FIFO of messages waiting for the hub's PUBACK.
//
// Layout under dir: segment files NNNNNNNNNNNNNNNNNNNN.seg (named by their
// first sequence number) of length-prefixed, CRC-checked records; an ack log
// acks.log of 8-byte sequence numbers; id, the outbox's random id (message
// ids are id-seq). A message is on disk (fsynced) before Put returns, so
// before it can be sent. Concurrent Puts share one fsync (group commit), so a
// burst costs one flash write, not one per message. Acks are appended without
// fsync: a crash forgets at most the last acks, and those messages are sent
// again (at-least-once; the stable id lets the cloud drop the copy). A torn
// record at the tail (power cut mid-write) is detected by its CRC and cut
// off on open. A segment whose every record was acked or evicted is deleted.
type Outbox struct {
	dir  string
	opts OutboxOptions
	id   string

	mu       sync.Mutex
	next     uint64
	live     []entry // sorted by seq; acked/evicted entries removed
	bytes    int64   // payload bytes of live entries
	segs     []*segment
	active   *segment
	acks     *os.File
	ackBuf   *bufio.Writer
	dirty    bool // segment data written but not fsynced
	lastAck  uint64
	lastAckT time.Time
	closed   bool

	syncMu sync.Mutex // serializes fsyncs; held without mu
	synced uint64     // highest seq known durable
	fsyncs int        // segment fsyncs done by Put (syncMu held); for tests and bench
}

type entry struct {
	seq  uint64
	kind Kind
	seg  *segment
	off  int64
	size int64 // record size on disk
}

type segment struct {
	first uint64
	path  string
	f     *os.File
	size  int64
	live  int
}

const (
	recHeader     = 8 // u32 length, u32 crc32c
	maxRecordSize = 512 << 10
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// OpenOutbox opens (creating) the outbox in dir and recovers its state.
func OpenOutbox(dir string, opts OutboxOptions) (*Outbox, error) {
	if opts.MaxBytes == 0 {
		opts.MaxBytes = 16 << 20
	}
	if opts.SegmentBytes == 0 {
		opts.SegmentBytes = 1 << 20
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	o := &Outbox{dir: dir, opts: opts}
	if err := o.loadID(); err != nil {
		return nil, err
	}
	acked, err := o.loadAcks()
	if err != nil {
		return nil, err
	}
	if err := o.loadSegments(acked); err != nil {
		return nil, err
	}
	if err := o.compactAcks(); err != nil {
		return nil, err
	}
	o.synced = o.next - 1
	return o, nil
}

func (o *Outbox) loadID() error {
	p := filepath.Join(o.dir, "id")
	b, err := os.ReadFile(p)
	if err == nil && len(strings.TrimSpace(string(b))) > 0 {
		o.id = strings.TrimSpace(string(b))
		return nil
	}
	raw := make([]byte, 6)
	rand.Read(raw)
	o.id = hex.EncodeToString(raw)
	if err := atomicfile.Write(p, []byte(o.id+"\n"), 0o600); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	return nil
}

func (o *Outbox) loadAcks() (map[uint64]bool, error) {
	acked := map[uint64]bool{}
	b, err := os.ReadFile(filepath.Join(o.dir, "acks.log"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	for i := 0; i+8 <= len(b); i += 8 { // a torn last entry is ignored
		acked[binary.LittleEndian.Uint64(b[i:])] = true
	}
	return acked, nil
}

func (o *Outbox) loadSegments(acked map[uint64]bool) error {
	ents, err := os.ReadDir(o.dir)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".seg") {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	o.next = 1
	for _, n := range names {
		first, err := strconv.ParseUint(strings.TrimSuffix(n, ".seg"), 10, 64)
		if err != nil {
			continue
		}
		seg := &segment{first: first, path: filepath.Join(o.dir, n)}
		if err := o.scan(seg, acked); err != nil {
			return err
		}
		if seg.live == 0 {
			os.Remove(seg.path)
			continue
		}
		o.segs = append(o.segs, seg)
	}
	return nil
}

// scan reads a segment's records, truncating a torn tail.
func (o *Outbox) scan(seg *segment, acked map[uint64]bool) error {
	f, err := os.OpenFile(seg.path, os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	r := bufio.NewReader(f)
	var off int64
	var hdr [recHeader]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			break
		}
		n := binary.LittleEndian.Uint32(hdr[0:])
		if n < 8 || n > maxRecordSize {
			break
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			break
		}
		if crc32.Checksum(payload, castagnoli) != binary.LittleEndian.Uint32(hdr[4:]) {
			break
		}
		seq := binary.LittleEndian.Uint64(payload)
		kind := Kind(0)
		if len(payload) > 8 {
			kind = Kind(payload[8])
		}
		size := int64(recHeader) + int64(n)
		if seq >= o.next {
			o.next = seq + 1
		}
		if !acked[seq] {
			o.live = append(o.live, entry{seq: seq, kind: kind, seg: seg, off: off, size: size})
			o.bytes += size
			seg.live++
		}
		off += size
	}
	if st, err := f.Stat(); err == nil && st.Size() != off {
		// Torn or corrupt tail: drop it so appends start on a record boundary.
		if err := f.Truncate(off); err != nil {
			f.Close()
			return fmt.Errorf("outbox: truncate torn tail of %s: %w", seg.path, err)
		}
	}
	seg.f, seg.size = f, off
	return nil
}

// compactAcks rewrites the ack log with only the acks that still matter,
// atomically: every seq in the surviving segments that is not live (each seq
// is written once, in order, so those are exactly the acked or evicted ones).
func (o *Outbox) compactAcks() error {
	var buf []byte
	if len(o.segs) > 0 {
		li := 0
		for seq := o.segs[0].first; seq < o.next; seq++ {
			for li < len(o.live) && o.live[li].seq < seq {
				li++
			}
			if li < len(o.live) && o.live[li].seq == seq {
				continue
			}
			buf = binary.LittleEndian.AppendUint64(buf, seq)
		}
	}
	p := filepath.Join(o.dir, "acks.log")
	if err := atomicfile.Write(p, buf, 0o600); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	o.acks, o.ackBuf = f, bufio.NewWriter(f)
	return nil
}

// ID is the outbox's id, the prefix of message ids.
func (o *Outbox) ID() string { return o.id }

// Put queues messages durably: when it returns nil, every message is on
// disk with its Seq and ID set. Health messages may evict older health
// messages to make room; an application message that does not fit fails
// with ErrOutboxFull and is not queued (nor are the ones after it).
// evicted counts health messages dropped to make room.
func (o *Outbox) Put(msgs ...*Message) (evicted int, err error) {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return 0, fmt.Errorf("outbox: %w", ErrClosed)
	}
	var last uint64
	for _, m := range msgs {
		rec, err := o.encode(m)
		if err != nil {
			o.mu.Unlock()
			return evicted, err
		}
		need := int64(len(rec))
		for o.bytes+need > o.opts.MaxBytes {
			if !o.evictHealth() {
				break
			}
			evicted++
		}
		if o.bytes+need > o.opts.MaxBytes {
			if m.Kind == KindHealth {
				evicted++ // no room even after evicting: this health message goes too
				continue
			}
			o.mu.Unlock()
			if last != 0 {
				o.syncTo(last)
			}
			return evicted, fmt.Errorf("outbox: %w (%d bytes queued, limit %d): the hub has been unreachable for long; the message stays with its producer", ErrOutboxFull, o.bytes, o.opts.MaxBytes)
		}
		if err := o.appendRecord(m, rec); err != nil {
			o.mu.Unlock()
			return evicted, err
		}
		last = m.Seq
	}
	o.mu.Unlock()
	if last == 0 {
		return evicted, nil
	}
	return evicted, o.syncTo(last)
}

// encode assigns Seq and ID and renders the record payload:
// u64 seq, u8 kind, u32 meta length, meta JSON, body.
func (o *Outbox) encode(m *Message) ([]byte, error) {
	m.Seq = o.next
	if m.ID == "" {
		m.ID = o.id + "-" + strconv.FormatUint(m.Seq, 10)
	}
	meta, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	n := 8 + 1 + 4 + len(meta) + len(m.Body)
	if n > maxRecordSize {
		return nil, fmt.Errorf("outbox: message of %d bytes exceeds %d; IoT Hub accepts at most 256 KB", len(m.Body), maxRecordSize)
	}
	rec := make([]byte, recHeader, recHeader+n)
	rec = binary.LittleEndian.AppendUint64(rec, m.Seq)
	rec = append(rec, byte(m.Kind))
	rec = binary.LittleEndian.AppendUint32(rec, uint32(len(meta)))
	rec = append(rec, meta...)
	rec = append(rec, m.Body...)
	binary.LittleEndian.PutUint32(rec[0:], uint32(n))
	binary.LittleEndian.PutUint32(rec[4:], crc32.Checksum(rec[recHeader:], castagnoli))
	return rec, nil
}

func (o *Outbox) appendRecord(m *Message, rec []byte) error {
	if o.active == nil || o.active.size >= o.opts.SegmentBytes {
		if err := o.newSegment(m.Seq); err != nil {
			return err
		}
	}
	s := o.active
	if _, err := s.f.WriteAt(rec, s.size); err != nil {
		// A partial write is cut off by the next open's CRC check; keep the
		// in-memory view unchanged so nothing points at it.
		return fmt.Errorf("outbox: write: %w (is the disk full?)", err)
	}
	o.live = append(o.live, entry{seq: m.Seq, kind: m.Kind, seg: s, off: s.size, size: int64(len(rec))})
	s.size += int64(len(rec))
	s.live++
	o.bytes += int64(len(rec))
	o.next = m.Seq + 1
	o.dirty = true
	return nil
}

func (o *Outbox) newSegment(first uint64) error {
	if o.active != nil && o.dirty {
		// Records in the old segment must be durable before a later fsync
		// of only the new one could claim they are.
		if err := o.active.f.Sync(); err != nil {
			return fmt.Errorf("outbox: fsync: %w", err)
		}
		o.dirty = false
	}
	p := filepath.Join(o.dir, fmt.Sprintf("%020d.seg", first))
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	if err := atomicfile.SyncDir(o.dir); err != nil {
		f.Close()
		return err
	}
	s := &segment{first: first, path: p, f: f}
	o.segs = append(o.segs, s)
	o.active = s
	return nil
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
	s := o.active
	o.dirty = false
	o.mu.Unlock()
	if s != nil {
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("outbox: fsync: %w", err)
		}
		o.fsyncs++
	}
	o.synced = target
	return nil
}

// evictHealth drops the oldest live health message; false if there is none.
func (o *Outbox) evictHealth() bool {
	for i, e := range o.live {
		if e.kind == KindHealth {
			o.drop(i)
			return true
		}
	}
	return false
}

// drop removes live[i], records it in the ack log and deletes its segment
// when nothing in it is live any more.
func (o *Outbox) drop(i int) {
	e := o.live[i]
	o.live = append(o.live[:i], o.live[i+1:]...)
	o.bytes -= e.size
	o.ackBuf.Write(binary.LittleEndian.AppendUint64(nil, e.seq))
	e.seg.live--
	if e.seg.live > 0 {
		return
	}
	// Keep the active segment until it is full: at one message a second,
	// creating and deleting a file per message would cost flash writes.
	if e.seg == o.active {
		if e.seg.size < o.opts.SegmentBytes {
			return
		}
		o.active = nil
	}
	o.removeSegment(e.seg)
	if len(o.segs) == 0 {
		o.resetAcks()
	}
}

func (o *Outbox) removeSegment(s *segment) {
	s.f.Close()
	os.Remove(s.path)
	for i, x := range o.segs {
		if x == s {
			o.segs = append(o.segs[:i], o.segs[i+1:]...)
			break
		}
	}
}

// Ack removes an acknowledged message. Unknown (already acked) seqs are
// ignored.
func (o *Outbox) Ack(seq uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	i := sort.Search(len(o.live), func(i int) bool { return o.live[i].seq >= seq })
	if i == len(o.live) || o.live[i].seq != seq {
		return nil
	}
	o.drop(i)
	o.lastAck, o.lastAckT = seq, o.opts.Now()
	return nil
}

// resetAcks empties the ack log once no segment is left (mu held): nothing
// it records can matter any more.
func (o *Outbox) resetAcks() {
	o.ackBuf.Reset(o.acks)
	o.acks.Truncate(0)
}

// Next returns up to n live messages with Seq > after, in order, bodies read
// from disk.
func (o *Outbox) Next(after uint64, n int) ([]*Message, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	i := sort.Search(len(o.live), func(i int) bool { return o.live[i].seq > after })
	var out []*Message
	for ; i < len(o.live) && len(out) < n; i++ {
		m, err := o.read(o.live[i])
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
	return out, nil
}

func (o *Outbox) read(e entry) (*Message, error) {
	buf := make([]byte, e.size)
	if _, err := e.seg.f.ReadAt(buf, e.off); err != nil {
		return nil, fmt.Errorf("outbox: read: %w", err)
	}
	p := buf[recHeader:]
	metaLen := binary.LittleEndian.Uint32(p[9:])
	m := &Message{}
	if err := json.Unmarshal(p[13:13+metaLen], m); err != nil {
		return nil, fmt.Errorf("outbox: corrupt record %d: %w", e.seq, err)
	}
	m.Seq = e.seq
	m.Body = p[13+metaLen:]
	return m, nil
}

// Depth is the number and size of queued messages.
func (o *Outbox) Depth() (messages int, bytes int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.live), o.bytes
}

// LastAcked is the last acknowledged message's seq and time (zero if none
// since open).
func (o *Outbox) LastAcked() (uint64, time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.lastAck, o.lastAckT
}

// Flush writes buffered acks to the ack log and fsyncs it and the active
// segment (clean shutdown, or periodically).
func (o *Outbox) Flush() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.flushLocked()
}

func (o *Outbox) flushLocked() error {
	if err := o.ackBuf.Flush(); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	if err := o.acks.Sync(); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	if o.active != nil && o.dirty {
		o.dirty = false
		return o.active.f.Sync()
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
	o.closed = true
	err := o.flushLocked()
	for _, s := range o.segs {
		s.f.Close()
	}
	o.acks.Close()
	return err
}

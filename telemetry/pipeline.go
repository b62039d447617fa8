package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/dirwatch"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// MaxMessageBytes is IoT Hub's limit for one device-to-cloud message: body
// plus the names and values of its properties.
const MaxMessageBytes = 256 << 10

// Conditions the pipeline raises and clears through its Sink (besides
// condition.DiskFull).
const (
	// CondOutboxFull: an application message does not fit in the outbox
	// even after evicting every health message; it waits in the spool.
	CondOutboxFull condition.Name = "outbox-full"
	// CondSpoolPolled: the spool directory could not be watched with
	// inotify, so it is scanned every dirwatch.PollEvery instead.
	CondSpoolPolled condition.Name = "spool-polled"
	// CondHubQuota: the hub keeps closing the connection at the first
	// message while accepting the connection itself: what it does once its
	// daily quota is used up (quota.go).
	CondHubQuota condition.Name = "hub-quota-exceeded"
	// CondSendSlowed: the hub slowed PUBACKs (traffic shaping) or closed
	// the connection after slowing them (throttling), and the drain sends
	// below its budget until PUBACKs come quickly again (pacer.go).
	CondSendSlowed condition.Name = "telemetry-throttled"
)

// Publisher is the hub session as the drain needs it; *transport.Session
// is one. PublishTelemetry starts a QoS 1 publish of a device-to-cloud
// message (system properties without "$.") and returns a function that
// waits for its PUBACK. Publishes started before waiting are pipelined and
// acknowledged in order. With a context that is already done, wait still
// reports a PUBACK that has arrived (a non-blocking check). Once the
// connection is gone every wait fails, and the drain ends.
type Publisher interface {
	PublishTelemetry(body []byte, system, app map[string]string) (wait func(context.Context) error)
}

// Sending is how the drain sends, which a config reload may change.
type Sending struct {
	// MaxRate is the send budget in messages per second (a packed message
	// counts as one); 0: unlimited, and no adaptation to the hub's
	// shaping either (pacer.go).
	MaxRate float64
	// Pack packs consecutive small JSON application messages with the
	// same properties into one message of at most PackBytes as the hub
	// meters it (default DefaultPackBytes), waiting at most PackWait for
	// more to join a pack that is not full (pack.go).
	Pack      bool
	PackBytes int
	PackWait  time.Duration
}

// Spool is the spool directory's settings, which a config reload may change.
type Spool struct {
	// Dir is watched for *.json files from local applications.
	Dir string
	// Settle is how long a file must be unchanged before it is read.
	Settle time.Duration
}

// Options set up a Pipeline. Nothing here is global: several pipelines
// (agents) may run in one process.
type Options struct {
	// StateDir is the agent's state directory: the outbox is
	// StateDir/outbox, and its file system is watched for disk-full.
	StateDir string
	// Outbox bounds the outbox; its Clock defaults to the pipeline's.
	Outbox outbox.Options
	// Spool returns the spool settings in effect; it is called whenever
	// they are needed, so a reload takes effect without a restart (a new
	// directory at the next rescan, within 30 s). Required.
	Spool func() Spool
	// Sending returns the send settings in effect; it is called for every
	// publish, so a reload takes effect at once. Default: unpaced, unpacked.
	Sending func() Sending
	// Sink receives the pipeline's conditions. Required.
	Sink condition.Sink
	// Clock runs every timer of the pipeline; default clock.Real.
	Clock clock.Clock
	// Logger is the agent's; default: discard.
	Logger *slog.Logger
	// Backlog, if set, is told when the drain starts sending a backlog
	// (true) and when the outbox is empty again (false).
	Backlog func(bool)
	// Changed, if set, is told that Stats changed: urgent when a user is
	// waiting to see it (a refused spool file), else it may be batched.
	Changed func(urgent bool)
	// Inotify stands in for inotify_init1 (tests: inotify that cannot be
	// had is a fault the kernel gives only when its per-user instance
	// limit is used up, which would break other tests).
	Inotify func() (fd int, err error)
}

// Stats are the pipeline's counters, for status and health.
type Stats struct {
	OutboxDepth   int   // messages queued
	OutboxBytes   int64 // their size
	LastAckID     string
	LastAckAt     time.Time
	SpoolRejected int64 // spool files refused since Open
	// SpoolRejectedRemoved counts refused files deleted from rejected/
	// since Open to keep it within RejectedKeep files and
	// RejectedKeepBytes.
	SpoolRejectedRemoved int64
	OutboxDamaged        int // damaged outbox records skipped at Open
	// SendRate is the drain's rate in effect (messages per second) and
	// SendBudget the configured one; both 0 when unpaced.
	SendRate, SendBudget float64
	// Quota is what the pipeline saw of the hub's daily quota (zero while
	// the hub takes messages).
	Quota QuotaStats
}

// Pipeline is one agent's telemetry path: spool intake, the outbox, the
// drain to the hub and the retirement of delivered spool files.
type Pipeline struct {
	o      Options
	log    *slog.Logger
	clock  clock.Clock
	sink   condition.Sink
	outbox *outbox.Outbox
	kick   chan struct{} // wakes the drain: the outbox got messages

	pace  pacer      // the send budget (pacer.go)
	quota quotaWatch // the hub's quota as seen (quota.go)
	// urgent holds the seqs of queued health messages, oldest first, until
	// acknowledged: the drain sends them ahead of a backlog.
	urgentMu sync.Mutex
	urgent   []uint64

	queued          queuedFiles // spool files in the outbox (spool.go)
	retire          retireQueue // delivered spool files on their way out (retire.go)
	rejected        atomic.Int64
	rejectedRemoved atomic.Int64
	prune           chan struct{} // wakes the retirer to bound rejected/
	damaged         int

	ackMu     sync.Mutex
	lastAckID string
	lastAckAt time.Time
}

// Open opens the outbox (reporting damaged records in the log and in
// Stats) and makes the spool directory if it is missing. Run starts the
// spool intake; Drain sends, one session at a time; Close closes.
func Open(o Options) (*Pipeline, error) {
	o.Clock = clock.Or(o.Clock)
	if o.Outbox.Clock == nil {
		o.Outbox.Clock = o.Clock
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Changed == nil {
		o.Changed = func(bool) {}
	}
	if o.Sending == nil {
		o.Sending = func() Sending { return Sending{} }
	}
	if o.Spool == nil || o.Sink == nil {
		return nil, errors.New("telemetry: Options.Spool and Options.Sink are required")
	}
	p := &Pipeline{o: o, log: o.Logger, clock: o.Clock, sink: o.Sink, kick: make(chan struct{}, 1), prune: make(chan struct{}, 1),
		queued: queuedFiles{sigs: map[string]dirwatch.Sig{}}, retire: retireQueue{kick: make(chan struct{}, 1)}}
	p.pace.clock = o.Clock
	// Each device draws its own probe times (quota.go): seeded per process.
	p.quota.rng = rand.New(rand.NewPCG(uint64(o.Clock.Now().UnixNano()), uint64(os.Getpid())))
	var err error
	if p.outbox, err = outbox.Open(filepath.Join(o.StateDir, "outbox"), o.Outbox); err != nil {
		return nil, err
	}
	if why := p.outbox.IDRenewed(); why != "" {
		p.log.Warn("outbox: message ids now start with a new outbox id, so none is ever used twice", "id", p.outbox.ID(), "reason", why)
	}
	if err := p.outbox.Unsaved(); err != nil {
		// A new state directory on a full disk: the agent runs, and
		// says so; the outbox saves its id before it writes anything.
		p.noteNoSpace(o.StateDir, err)
	}
	// Files delivered before a crash or a stop, perhaps still in the
	// spool: the retirer removes them first; loadQueued keeps the spool
	// loop from queueing them meanwhile. Here, before Run starts either:
	// the retirer may take a receipt at once, and a spool loop that read
	// the queue after that sent the file again (a race CI found).
	p.retire.add(p.outbox.Receipts())
	p.loadQueued()
	for _, c := range p.outbox.Corrupted() {
		p.log.Error("outbox: damaged records skipped (a power cut or a bad flash block); application messages among them are sent again from the spool",
			"segment", c.Segment, "records", c.Skipped, "bytes", c.Bytes)
		p.damaged += c.Skipped
	}
	dir := o.Spool().Dir
	if err := p.makeSpool(dir); err != nil {
		p.outbox.Close()
		return nil, err
	}
	p.checkSpoolMode(dir)
	return p, nil
}

// makeSpool makes the spool directory if it is missing. It is normally
// made by tmpfiles.d; this is for a private setup, with the same mode
// whatever the umask. On a full disk it is left for later (disk-full says
// so; the spool loop tries again once there is room).
func (p *Pipeline) makeSpool(dir string) error {
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := os.MkdirAll(dir, 0o770); err != nil {
		if diskspace.NoSpace(err) {
			p.noteNoSpace(filepath.Dir(dir), err)
			return nil
		}
		return fmt.Errorf("spool directory: %w", err)
	}
	if err := os.Chmod(dir, spoolMode); err != nil {
		// Under the unit's RestrictSUIDSGID no set-group-id bit can be
		// set: files then keep their writers' groups, which a private
		// setup without the spool group does not need.
		os.Chmod(dir, spoolMode&^os.ModeSetgid)
	}
	return nil
}

// spoolMode is the spool directory's mode (3770, as systemd/gwagent.tmpfiles
// makes it): the group gwagent-spool may add files; setgid gives them that
// group, so the agent can read them; sticky lets only a file's owner (and
// the agent, which owns the directory) delete or replace it, so one
// application cannot delete or forge another's messages.
const spoolMode = os.ModeSticky | os.ModeSetgid | 0o770

// checkSpoolMode warns when the spool directory lets applications delete
// or replace each other's files (no sticky bit), as the spool of an
// install older than that rule does until tmpfiles.d is applied again.
func (p *Pipeline) checkSpoolMode(dir string) {
	st, err := os.Stat(dir)
	if err != nil || !st.IsDir() {
		return
	}
	if st.Mode().Perm()&0o022 != 0 && st.Mode()&os.ModeSticky == 0 {
		p.log.Warn("the spool directory lacks the sticky bit: applications that may write it can delete or replace each other's messages",
			"dir", dir, "mode", fmt.Sprintf("%04o", st.Mode().Perm()|fileModeBits(st.Mode())),
			"hint", "chmod 3770 "+dir+" (systemd-tmpfiles --create applies the package's gwagent.conf)")
	}
}

// fileModeBits renders the set-id and sticky bits of m as in chmod.
func fileModeBits(m os.FileMode) os.FileMode {
	var b os.FileMode
	if m&os.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&os.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&os.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

// Run runs the spool intake and the retirer (which removes delivered spool
// files and bounds rejected/) until ctx ends.
func (p *Pipeline) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { p.retireLoop(ctx) })
	wg.Go(func() { p.spoolLoop(ctx) })
	wg.Wait()
}

// retireLoop removes delivered spool files as the acker reports them
// (retire.go), and keeps rejected/ to its bounds (rejected.go) after each
// refusal and at start.
func (p *Pipeline) retireLoop(ctx context.Context) {
	defer p.retire.closeDir()
	dir := p.o.Spool().Dir
	p.removeOldSent(dir)
	p.pruneRejected(dir)
	for {
		p.retireQueued()
		select {
		case <-ctx.Done():
			return
		case <-p.retire.kick:
		case <-p.prune:
			p.pruneRejected(p.o.Spool().Dir)
		}
	}
}

// Close removes the delivered spool files still waiting for the retirer,
// then closes the outbox, writing out what it holds in memory. Call it
// after Run and every Drain have returned.
func (p *Pipeline) Close() error {
	p.retireQueued()
	p.retire.closeDir()
	return p.outbox.Close()
}

// Stats reads the counters.
func (p *Pipeline) Stats() Stats {
	n, b := p.outbox.Depth()
	p.ackMu.Lock()
	id, at := p.lastAckID, p.lastAckAt
	p.ackMu.Unlock()
	rate, budget := p.pace.current()
	return Stats{OutboxDepth: n, OutboxBytes: b, LastAckID: id, LastAckAt: at, SpoolRejected: p.rejected.Load(),
		SpoolRejectedRemoved: p.rejectedRemoved.Load(), OutboxDamaged: p.damaged,
		SendRate: rate, SendBudget: budget, Quota: p.quota.stats()}
}

// ConnectAfter is the earliest time the next hub connection should be
// attempted; zero when nothing holds it back. While the hub refuses
// messages as it does over its daily quota, that is the next probe
// (quota.go): the agent waits for it instead of reconnecting at once.
func (p *Pipeline) ConnectAfter() time.Time { return p.quota.connectAfter() }

// HubTakes waits, while the hub was last seen refusing messages, until a
// telemetry message is acknowledged on the current session, and returns
// false if ctx ends first; otherwise it returns true at once. The twin
// synchronisation and certificate renewal wait on it: over the quota, a
// twin request closes the connection just as a message does.
func (p *Pipeline) HubTakes(ctx context.Context) bool { return p.quota.waitCleared(ctx) }

// Enqueue queues messages the agent makes (health): see outbox.Outbox.Put
// for what may be evicted. A full disk raises condition.DiskFull.
func (p *Pipeline) Enqueue(msgs ...*outbox.Message) error {
	err := p.enqueue(msgs...)
	if err != nil {
		p.noteNoSpace(p.o.StateDir, err)
	}
	return err
}

func (p *Pipeline) enqueue(msgs ...*outbox.Message) error {
	evicted, err := p.outbox.Put(msgs...)
	if err == nil {
		p.noteUrgent(msgs)
	}
	if evicted > 0 {
		p.log.Warn("outbox full: dropped oldest health messages", "dropped", evicted)
	}
	if errors.Is(err, outbox.ErrFull) {
		p.sink.Raise(CondOutboxFull, err.Error())
	} else if err == nil {
		p.sink.Clear(CondOutboxFull)
	}
	p.o.Changed(false)
	p.wake()
	return err
}

// wake tells the drain there is something new in the outbox.
func (p *Pipeline) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// diskCheckEvery is how often the spool intake looks whether space was
// freed while condition.DiskFull is raised (a statfs, nothing written).
const diskCheckEvery = 5 * time.Second

// noteNoSpace raises condition.DiskFull if err says the file system of dir
// is full, and reports whether it did.
func (p *Pipeline) noteNoSpace(dir string, err error) bool {
	return diskspace.Note(p.sink, dir, err)
}

// repeatedNoSpace notes err like noteNoSpace and reports whether it is a
// no-space error that disk-full already announced: the caller then logs it
// at debug level instead of repeating, many times a second, what the
// condition says once.
func (p *Pipeline) repeatedNoSpace(dir string, err error) bool {
	was := p.diskFull()
	return p.noteNoSpace(dir, err) && was
}

func (p *Pipeline) diskFull() bool { return p.sink.Has(condition.DiskFull) }

// roomAgain clears condition.DiskFull once the file systems of the state
// and spool directories each have room for a whole message and a few
// files, and reports whether it did.
func (p *Pipeline) roomAgain() bool {
	return diskspace.ClearWhenRoom(p.sink, MaxMessageBytes, 16, p.o.StateDir, p.o.Spool().Dir)
}

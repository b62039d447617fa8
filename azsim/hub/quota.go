package hub

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// quota is the hub's daily message quota (Learn, "IoT Hub quotas and
// throttling" and "Azure IoT Hub billing information"): operations are
// charged in chunks (4 KB, 0.5 KB on Free), and once the day's messages are
// used up the hub refuses them with 403002 IoTHubQuotaExceeded until the
// next UTC day. Its clock is the hub's plus an offset tests move through the
// admin API. A nil *quota charges nothing and is never exhausted.
type quota struct {
	limit int64
	chunk int
	now   func() time.Time
	path  string // quota.json; "" when nothing is persisted

	mu     sync.Mutex
	used   int64
	day    string        // UTC date (2006-01-02) the use belongs to
	offset time.Duration // quota clock = now() + offset
	dirty  bool
}

// quotaFile is quota.json: the day's use survives an azsim restart, as the
// real hub's does.
type quotaFile struct {
	Day    string        `json:"day"`
	Used   int64         `json:"used"`
	Offset time.Duration `json:"clockOffsetNanoseconds"`
}

const quotaFileName = "quota.json"

// newQuota loads dir/quota.json if there is one. A damaged file does not
// stop the hub: the use starts from zero and the returned warning says so.
func newQuota(limit int64, chunk int, now func() time.Time, dir string) (*quota, string) {
	q := &quota{limit: limit, chunk: chunk, now: now}
	if dir == "" {
		return q, ""
	}
	q.path = filepath.Join(dir, quotaFileName)
	b, err := os.ReadFile(q.path)
	if errors.Is(err, fs.ErrNotExist) {
		return q, ""
	}
	var f quotaFile
	if err == nil {
		err = json.Unmarshal(b, &f)
	}
	if err == nil && (f.Used < 0 || (f.Day != "" && !validDay(f.Day))) {
		err = errors.New("negative use or a day that is not YYYY-MM-DD")
	}
	if err != nil {
		return q, fmt.Sprintf("%s is damaged (%v): today's quota use starts again from 0 and the quota clock offset is dropped", q.path, err)
	}
	q.used, q.day, q.offset = f.Used, f.Day, f.Offset
	return q, ""
}

func validDay(s string) bool {
	_, err := time.Parse(time.DateOnly, s)
	return err == nil
}

// clockLocked is the quota clock; it also starts a new day's count when the
// UTC date has changed since the last use.
func (q *quota) clockLocked() time.Time {
	t := q.now().Add(q.offset).UTC()
	if d := t.Format(time.DateOnly); d != q.day {
		q.day, q.used, q.dirty = d, 0, true
	}
	return t
}

// chunks is what an operation of size bytes costs: at least one chunk.
func (q *quota) chunks(size int) int64 {
	return max(1, int64((size+q.chunk-1)/q.chunk))
}

// exhausted reports whether the day's messages are used up.
func (q *quota) exhausted() bool {
	if q == nil {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.clockLocked()
	return q.used >= q.limit
}

// charge counts an operation of size bytes. The check (exhausted) comes
// before: an operation admitted while there was room is charged in full,
// so the use can end a message above the limit.
func (q *quota) charge(size int) {
	if q == nil {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.clockLocked()
	q.used += q.chunks(size)
	q.dirty = true
}

// errExhausted is the admin API's answer to a cloud-side operation (C2D, a
// direct method) while the quota is used up.
func (q *quota) errExhausted() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return errorf(http.StatusForbidden, "403002 IoTHubQuotaExceeded: the hub's daily quota of %d messages is used up until 00:00 UTC (quota clock %s); raise it with PUT /hub/quota or move the clock with POST /hub/quota/clock",
		q.limit, q.clockLocked().Format(time.RFC3339))
}

// QuotaView is the daily quota as GET /hub/quota shows it.
type QuotaView struct {
	Enabled   bool   `json:"enabled"`
	Limit     int64  `json:"limit"`
	Used      int64  `json:"used"`
	Remaining int64  `json:"remaining"`
	ChunkSize int    `json:"chunkBytes"`
	Exhausted bool   `json:"exhausted"`
	Day       string `json:"day"`
	// Clock is the quota clock (the hub's clock plus ClockOffset); the
	// count starts again at ResetsAt, 00:00 UTC by that clock.
	Clock       time.Time `json:"clock"`
	ClockOffset string    `json:"clockOffset"`
	ResetsAt    time.Time `json:"resetsAt"`
}

func (q *quota) view() QuotaView {
	if q == nil {
		return QuotaView{}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	now := q.clockLocked()
	day, _ := time.Parse(time.DateOnly, q.day)
	return QuotaView{Enabled: true, Limit: q.limit, Used: q.used, Remaining: max(0, q.limit-q.used), ChunkSize: q.chunk,
		Exhausted: q.used >= q.limit, Day: q.day, Clock: now, ClockOffset: q.offset.String(), ResetsAt: day.AddDate(0, 0, 1)}
}

// setUsed sets today's use (tests: a quota nearly or fully used).
func (q *quota) setUsed(n int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.clockLocked()
	q.used, q.dirty = n, true
}

// setClock moves the quota clock so that it reads t now.
func (q *quota) setClock(t time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.offset, q.dirty = t.Sub(q.now()), true
}

// advanceClock moves the quota clock forward (or back) by d.
func (q *quota) advanceClock(d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.offset, q.dirty = q.offset+d, true
}

// save writes quota.json if anything changed since the last save. Use is
// saved periodically, not per message: a crash loses at most the last
// period's count (a kinder hub, never a harder one).
func (q *quota) save() error {
	if q == nil || q.path == "" {
		return nil
	}
	q.mu.Lock()
	if !q.dirty {
		q.mu.Unlock()
		return nil
	}
	b, err := json.Marshal(quotaFile{Day: q.day, Used: q.used, Offset: q.offset})
	q.dirty = false
	q.mu.Unlock()
	if err != nil {
		return err
	}
	if err := writeFileAtomic(q.path, b, 0o600); err != nil {
		q.mu.Lock()
		q.dirty = true
		q.mu.Unlock()
		return fmt.Errorf("save quota use: %w", err)
	}
	return nil
}

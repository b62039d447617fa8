// Package health makes the gateway's health message: what the kernel tells
// about the board (/proc, statfs, thermal zones, read into one reused
// buffer) and what the agent tells about itself (state, conditions, the
// certificate's days left, the outbox), queued every interval on the
// telemetry pipeline. The interval comes from the config and the twin's
// desired telemetryInterval (SetInterval).
//
// It is one of the agent's own parts: only agent/ imports it. It reads the
// agent's status (agent/status) and queues through the pipeline's Enqueue;
// it times everything on the clock it is handed and logs only through the
// logger it is handed. Loop.Run is the one goroutine that reads /proc;
// SetInterval and ReachedHub may be called from any goroutine.
package health

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/telemetry"
)

// Health is the gateway health message the agent sends every interval.
type Health struct {
	Time           time.Time `json:"time"`
	UptimeSeconds  float64   `json:"uptimeSeconds"`
	AgentUptime    float64   `json:"agentUptimeSeconds"`
	Load1          float64   `json:"load1"`
	Load5          float64   `json:"load5"`
	Load15         float64   `json:"load15"`
	MemTotalKB     int64     `json:"memTotalKB"`
	MemAvailableKB int64     `json:"memAvailableKB"`
	DiskTotalBytes uint64    `json:"diskTotalBytes"`
	DiskFreeBytes  uint64    `json:"diskFreeBytes"`
	TemperatureC   *float64  `json:"temperatureC,omitempty"`
	CertDaysLeft   *float64  `json:"certDaysLeft,omitempty"`
	OutboxDepth    int       `json:"outboxDepth"`
	SpoolRejected  int64     `json:"spoolRejected"`
	// SpoolRejectedRemoved: refused files removed from rejected/ to keep it
	// within its bounds, since the agent started.
	SpoolRejectedRemoved int64 `json:"spoolRejectedRemoved,omitempty"`
	// SendRate and HubQuota: as in Status.
	SendRate         float64               `json:"sendRate,omitempty"`
	HubQuota         *telemetry.QuotaStats `json:"hubQuota,omitempty"`
	AgentVersion     string                `json:"agentVersion"`
	AgentState       string                `json:"agentState"`
	Transport        string                `json:"transport,omitempty"`
	ConditionsActive []string              `json:"conditions,omitempty"`
}

// Source reads what the kernel tells about the gateway into one
// reused buffer: at one message a second, reading /proc with os.ReadFile,
// strings.Split and strings.Fields cost ~16 KB of garbage per message.
// Used by the health loop only (not safe for concurrent use).
type Source struct {
	buf     [4096]byte
	zones   []string // thermal zone files, found once
	globbed bool
}

// file reads a small /proc or /sys file into the buffer.
func (s *Source) file(path string) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	n, _ := io.ReadFull(f, s.buf[:])
	return s.buf[:n]
}

// fields splits b at spaces into at most len(out) fields without allocating.
func fields(b []byte, out [][]byte) int {
	n := 0
	for n < len(out) {
		b = bytes.TrimLeft(b, " \t\n")
		if len(b) == 0 {
			break
		}
		i := bytes.IndexAny(b, " \t\n")
		if i < 0 {
			i = len(b)
		}
		out[n], b = b[:i], b[i:]
		n++
	}
	return n
}

func parseFloat(b []byte) float64 {
	// strconv.ParseFloat on a []byte converted in the call does not allocate.
	v, _ := strconv.ParseFloat(string(b), 64)
	return v
}

// meminfoKB finds "key: N kB" in /proc/meminfo's text.
func meminfoKB(b []byte, key string) int64 {
	i := bytes.Index(b, []byte("\n"+key))
	if i < 0 {
		if !bytes.HasPrefix(b, []byte(key)) {
			return 0
		}
	} else {
		b = b[i+1:]
	}
	var f [2][]byte
	if fields(b[len(key):], f[:]) < 1 {
		return 0
	}
	v, _ := strconv.ParseInt(string(f[0]), 10, 64)
	return v
}

// Read reads the board's figures at now; stateDir's file system is the
// disk reported.
func (s *Source) Read(now time.Time, stateDir string) Health {
	h := Health{Time: now.UTC()}
	var f [3][]byte
	if fields(s.file("/proc/uptime"), f[:1]) == 1 {
		h.UptimeSeconds = parseFloat(f[0])
	}
	if fields(s.file("/proc/loadavg"), f[:]) == 3 {
		h.Load1, h.Load5, h.Load15 = parseFloat(f[0]), parseFloat(f[1]), parseFloat(f[2])
	}
	if b := s.file("/proc/meminfo"); len(b) > 0 {
		h.MemTotalKB = meminfoKB(b, "MemTotal:")
		h.MemAvailableKB = meminfoKB(b, "MemAvailable:")
	}
	var fs syscall.Statfs_t
	if syscall.Statfs(stateDir, &fs) == nil {
		h.DiskTotalBytes = uint64(fs.Blocks) * uint64(fs.Bsize)
		h.DiskFreeBytes = uint64(fs.Bavail) * uint64(fs.Bsize)
	}
	if !s.globbed {
		s.zones, _ = filepath.Glob("/sys/class/thermal/thermal_zone*/temp")
		s.globbed = true
	}
	var max float64
	found := false
	for _, z := range s.zones {
		b := s.file(z)
		if len(b) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(string(bytes.TrimSpace(b)), 64)
		if err != nil {
			continue
		}
		if c := v / 1000; !found || c > max {
			max, found = c, true
		}
	}
	if found {
		h.TemperatureC = &max
	}
	return h
}

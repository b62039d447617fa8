package agent

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Health is the gateway health message the agent sends every interval.
type Health struct {
	Time             time.Time `json:"time"`
	UptimeSeconds    float64   `json:"uptimeSeconds"`
	AgentUptime      float64   `json:"agentUptimeSeconds"`
	Load1            float64   `json:"load1"`
	Load5            float64   `json:"load5"`
	Load15           float64   `json:"load15"`
	MemTotalKB       int64     `json:"memTotalKB"`
	MemAvailableKB   int64     `json:"memAvailableKB"`
	DiskTotalBytes   uint64    `json:"diskTotalBytes"`
	DiskFreeBytes    uint64    `json:"diskFreeBytes"`
	TemperatureC     *float64  `json:"temperatureC,omitempty"`
	CertDaysLeft     *float64  `json:"certDaysLeft,omitempty"`
	OutboxDepth      int       `json:"outboxDepth"`
	SpoolRejected    int64     `json:"spoolRejected"`
	AgentVersion     string    `json:"agentVersion"`
	AgentState       string    `json:"agentState"`
	Transport        string    `json:"transport,omitempty"`
	ConditionsActive []string  `json:"conditions,omitempty"`
}

// readHealth gathers what the kernel tells about the gateway. Missing
// sources (no thermal zone, a container without /proc/meminfo) leave the
// field zero or absent rather than failing.
func readHealth(now time.Time, stateDir string) Health {
	h := Health{Time: now.UTC()}
	if b, err := os.ReadFile("/proc/uptime"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			h.UptimeSeconds, _ = strconv.ParseFloat(f[0], 64)
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			h.Load1, _ = strconv.ParseFloat(f[0], 64)
			h.Load5, _ = strconv.ParseFloat(f[1], 64)
			h.Load15, _ = strconv.ParseFloat(f[2], 64)
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			v, _ := strconv.ParseInt(f[1], 10, 64)
			switch f[0] {
			case "MemTotal:":
				h.MemTotalKB = v
			case "MemAvailable:":
				h.MemAvailableKB = v
			}
		}
	}
	var fs syscall.Statfs_t
	if syscall.Statfs(stateDir, &fs) == nil {
		h.DiskTotalBytes = uint64(fs.Blocks) * uint64(fs.Bsize)
		h.DiskFreeBytes = uint64(fs.Bavail) * uint64(fs.Bsize)
	}
	if zones, _ := filepath.Glob("/sys/class/thermal/thermal_zone*/temp"); len(zones) > 0 {
		var max float64
		found := false
		for _, z := range zones {
			b, err := os.ReadFile(z)
			if err != nil {
				continue
			}
			v, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
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
	}
	return h
}

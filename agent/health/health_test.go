package health

import (
	"encoding/json"
	"testing"
	"time"
)

func BenchmarkReadHealth(b *testing.B) {
	b.ReportAllocs()
	var src Source
	for i := 0; i < b.N; i++ {
		h := src.Read(time.Now(), "/tmp")
		json.Marshal(h)
	}
}

// TestHealthSourceParses: the allocation-free reader finds the same
// figures in /proc as a plain reading would.
func TestHealthSourceParses(t *testing.T) {
	var src Source
	h := src.Read(time.Now(), t.TempDir())
	if h.MemTotalKB <= 0 || h.MemAvailableKB <= 0 || h.MemAvailableKB > h.MemTotalKB || h.UptimeSeconds <= 0 || h.DiskTotalBytes == 0 {
		t.Fatalf("health figures missing: %+v", h)
	}
	b := []byte("MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   12345 kB\n")
	if meminfoKB(b, "MemTotal:") != 24000000 || meminfoKB(b, "MemAvailable:") != 12345 || meminfoKB(b, "Nope:") != 0 {
		t.Fatal("meminfo parsing")
	}
}

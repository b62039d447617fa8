package hub

import (
	"fmt"
	"strings"
)

// Tier is what an IoT Hub pricing tier and number of units allow, hub-wide.
// Sources (Microsoft Learn): "IoT Hub quotas and throttling"
// (learn.microsoft.com/azure/iot-hub/iot-hub-devguide-quotas-throttling):
// the operation throttles per tier; "Choose the right IoT Hub tier and size"
// (learn.microsoft.com/azure/iot-hub/iot-hub-scaling): messages per day per
// unit and the unit limits; "Azure IoT Hub billing information"
// (learn.microsoft.com/azure/iot-hub/iot-hub-devguide-pricing): the 4 KB
// (Free: 0.5 KB) metering chunk.
type Tier struct {
	Name  string `json:"tier"`
	Units int    `json:"units"`
	// ConnectRate is new device connections per second.
	ConnectRate int `json:"connectRate"`
	// D2CRate is device-to-cloud send operations per second (messages,
	// whatever their size).
	D2CRate int `json:"d2cRate"`
	// TwinRate is twin updates per second (azsim applies it to twin reads
	// and updates together, the harder reading).
	TwinRate int `json:"twinRate"`
	// DailyQuota is messages per UTC day, counted in ChunkBytes chunks.
	DailyQuota int64 `json:"dailyQuota"`
	ChunkBytes int   `json:"chunkBytes"`
}

// TierLimits returns the limits of units units of tier name (F1, B1, B2,
// B3, S1, S2, S3; any case). Free hubs have one unit; B3 and S3 up to 10,
// the others up to 200.
func TierLimits(name string, units int) (Tier, error) {
	n := strings.ToUpper(strings.TrimSpace(name))
	maxUnits := 200
	switch n {
	case "F1":
		maxUnits = 1
	case "B3", "S3":
		maxUnits = 10
	case "B1", "B2", "S1", "S2":
	default:
		return Tier{}, fmt.Errorf("hub tier %q is not one of F1, B1, B2, B3, S1, S2, S3", name)
	}
	if units < 1 || units > maxUnits {
		return Tier{}, fmt.Errorf("hub tier %s takes 1 to %d units, not %d", n, maxUnits, units)
	}
	u := units
	t := Tier{Name: n, Units: u, ChunkBytes: 4096}
	switch n {
	case "F1", "B1", "S1":
		// "Higher of 100/sec or 12/sec/unit" for connections and D2C sends.
		t.ConnectRate, t.D2CRate, t.TwinRate = max(100, 12*u), max(100, 12*u), 50
		t.DailyQuota = 400_000 * int64(u)
		if n == "F1" {
			t.DailyQuota, t.ChunkBytes = 8_000, 512
		}
	case "B2", "S2":
		t.ConnectRate, t.D2CRate, t.TwinRate = 120*u, 120*u, max(50, 5*u)
		t.DailyQuota = 6_000_000 * int64(u)
	case "B3", "S3":
		t.ConnectRate, t.D2CRate, t.TwinRate = 6000*u, 6000*u, 250*u
		t.DailyQuota = 300_000_000 * int64(u)
	}
	return t, nil
}

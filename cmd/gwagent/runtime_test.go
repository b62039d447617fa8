package main

import (
	"testing"
	"time"
)

// While the agent allocates, its memory goes back every 15 s; while it is
// idle, the looks thin out to one every two minutes, and the first
// allocation worth returning brings the 15 s back.
func TestFreeSchedule(t *testing.T) {
	wait := freeEvery
	var looks []time.Duration
	for i := 0; i < 6; i++ {
		collect, next := freeSchedule(0, wait)
		if collect {
			t.Fatalf("look %d: a collection with nothing allocated", i)
		}
		wait = next
		looks = append(looks, wait)
	}
	want := []time.Duration{30 * time.Second, time.Minute, 2 * time.Minute, 2 * time.Minute, 2 * time.Minute, 2 * time.Minute}
	for i := range want {
		if looks[i] != want[i] {
			t.Fatalf("idle looks %v, want %v", looks, want)
		}
	}
	collect, next := freeSchedule(20<<10, wait)
	if !collect || next != freeEvery {
		t.Fatalf("20 KiB allocated (one reading a second): collect %v, next look in %s", collect, next)
	}
}

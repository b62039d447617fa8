// Package faults lets tests and people make azsim misbehave on demand:
// answer the next N requests with an error status, refuse connections for a
// while, delay DPS assignment. One Injector per emulator instance; it is safe
// for concurrent use and has no global state.
package faults

import (
	"strings"
	"sync"
	"time"
)

// Target names the service a fault applies to.
type Target string

const (
	DPS Target = "dps"
	Hub Target = "hub"
)

// Answer is an injected reply: Status (429, 500, 503, ...) and, when
// non-zero, the retry-after seconds to send with it.
type Answer struct {
	Status     int `json:"status"`
	RetryAfter int `json:"retryAfter,omitempty"`
}

// Injector holds the faults armed for one emulator.
type Injector struct {
	mu          sync.Mutex
	answers     map[Target][]Answer
	refuseUntil map[Target]time.Time
	assignDelay time.Duration
	tamper      []Tamper
	rejectCerts map[string]bool // serials (hex) the hub refuses in the TLS handshake
	credentials CredentialsMode
	twinDelay   time.Duration // how long the hub holds the next twin answers
	twinDelayN  int           // how many answers are still to be held
}

// CredentialsMode is how the hub treats certificate-signing requests.
type CredentialsMode string

const (
	CredentialsNormal CredentialsMode = ""
	// CredentialsSilent: PUBACK, then nothing: no 202, no answer.
	CredentialsSilent CredentialsMode = "silent"
	// CredentialsDrop: the hub closes the connection on the request.
	CredentialsDrop CredentialsMode = "drop"
	// CredentialsLoseAnswer: the next certificate answer (the 200 with
	// the certificate) is lost in a connection drop: the hub counts it as
	// sent (its QoS 0 publish needs no acknowledgement) and
	// the connection closes before the device reads it. It applies once;
	// then the mode is normal again.
	CredentialsLoseAnswer CredentialsMode = "lose-answer"
)

// TakeAnswerLoss reports whether the next certificate answer is to be lost, and
// returns the mode to normal if so.
func (i *Injector) TakeAnswerLoss() bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.credentials != CredentialsLoseAnswer {
		return false
	}
	i.credentials = CredentialsNormal
	return true
}

// SetCredentialsMode makes the hub answer certificate-signing requests
// normally, never, or by dropping the connection, until changed.
func (i *Injector) SetCredentialsMode(m CredentialsMode) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.credentials = m
}

// CredentialsMode is the current mode.
func (i *Injector) CredentialsMode() CredentialsMode {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.credentials
}

// Tamper spoils the next issued certificate chain, to test that devices
// validate before trusting: a leaf for another key, a leaf with another CN,
// or a chain that lacks its intermediate.
type Tamper string

const (
	TamperWrongKey    Tamper = "wrong-key"
	TamperWrongCN     Tamper = "wrong-cn"
	TamperBrokenChain Tamper = "broken-chain"
)

// ArmTamper spoils the next issued chain with kind.
func (i *Injector) ArmTamper(kind Tamper) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.tamper = append(i.tamper, kind)
}

// TakeTamper returns and disarms the next tamper, if any.
func (i *Injector) TakeTamper() (Tamper, bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if len(i.tamper) == 0 {
		return "", false
	}
	k := i.tamper[0]
	i.tamper = i.tamper[1:]
	return k, true
}

// New returns an Injector with nothing armed.
func New() *Injector {
	return &Injector{answers: map[Target][]Answer{}, refuseUntil: map[Target]time.Time{}}
}

// Arm makes the next n requests to t get answer a instead of being served.
func (i *Injector) Arm(t Target, n int, a Answer) {
	i.mu.Lock()
	defer i.mu.Unlock()
	for ; n > 0; n-- {
		i.answers[t] = append(i.answers[t], a)
	}
}

// Take returns the next armed answer for t, if any, and disarms it.
func (i *Injector) Take(t Target) (Answer, bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	q := i.answers[t]
	if len(q) == 0 {
		return Answer{}, false
	}
	i.answers[t] = q[1:]
	return q[0], true
}

// RefuseUntil makes t refuse new connections (CONNACK "server unavailable")
// until the given time.
func (i *Injector) RefuseUntil(t Target, until time.Time) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.refuseUntil[t] = until
}

// Refusing reports whether t refuses connections at now.
func (i *Injector) Refusing(t Target, now time.Time) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return now.Before(i.refuseUntil[t])
}

// SetAssignDelay makes DPS keep registrations in "assigning" for d.
func (i *Injector) SetAssignDelay(d time.Duration) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.assignDelay = d
}

// AssignDelay is the current DPS assignment delay.
func (i *Injector) AssignDelay() time.Duration {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.assignDelay
}

// DelayTwin makes the hub hold its answers to the next count twin requests
// (GET or reported PATCH) for d before sending them: a slow hub.
func (i *Injector) DelayTwin(d time.Duration, count int) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.twinDelay, i.twinDelayN = d, count
}

// TakeTwinDelay returns how long to hold the current twin answer, using up
// one of DelayTwin's count; zero when none is armed.
func (i *Injector) TakeTwinDelay() time.Duration {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.twinDelayN <= 0 {
		return 0
	}
	i.twinDelayN--
	return i.twinDelay
}

// RejectCertificate makes the hub and DPS refuse the certificate with this
// serial (hex, any case, leading zeros or not) inside the TLS handshake,
// with a bad_certificate alert, as if its CA had been removed from the hub
// or the enrollment.
func (i *Injector) RejectCertificate(serialHex string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.rejectCerts == nil {
		i.rejectCerts = map[string]bool{}
	}
	i.rejectCerts[serialKey(serialHex)] = true
}

// CertificateRejected reports whether RejectCertificate named serialHex.
func (i *Injector) CertificateRejected(serialHex string) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.rejectCerts[serialKey(serialHex)]
}

// serialKey is one spelling of a hex serial: gwagent prints serials with
// their leading zeros (0df9...), big.Int.Text(16) without.
func serialKey(serialHex string) string {
	return strings.ToLower(strings.TrimLeft(serialHex, "0"))
}

// Reset disarms everything.
func (i *Injector) Reset() {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.answers = map[Target][]Answer{}
	i.refuseUntil = map[Target]time.Time{}
	i.assignDelay = 0
	i.tamper = nil
	i.rejectCerts = nil
	i.credentials = CredentialsNormal
	i.twinDelay, i.twinDelayN = 0, 0
}

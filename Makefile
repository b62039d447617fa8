# gwagent — see README.md. `make demo` and `make test` are the two commands a
# newcomer runs; everything else is for building and measuring.

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
BUILDTIME ?= $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.buildTime=$(BUILDTIME)
BIN      := bin
# The binaries that ship are compiled with packaging/ship-env's settings
# (collector, inlining); the tests build with Go's defaults.
SHIP     := . ./packaging/ship-env &&
# The tests run swtpm and SoftHSM2 for real; a missing one is a failure, not a skip.
export GWAGENT_REQUIRE_DEVICES ?= 1
# 2-core machines: two packages at a time.
TESTFLAGS ?= -p 2 -count=1 -timeout 20m
ifeq ($(RACE),1)
TESTFLAGS += -race
endif

.PHONY: all build test demo cross lint bench deps clean fuzz sdkcheck

all: build

build:
	$(SHIP) $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent ./cmd/gwagent
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/azsim ./cmd/azsim

deps:
	./testdata/install-deps.sh

test: deps
	$(GO) vet ./...
	$(GO) test $(TESTFLAGS) ./...
	# Fuzz budgets are execution counts (about 10 s each here), not durations:
	# Go 1.26's fuzz coordinator can fail a clean run with "context deadline
	# exceeded" when a -fuzztime duration ends (golang/go#75804, fixed in 1.27).
	$(GO) test -run=^$$ -fuzz=FuzzDPSReply -fuzztime=100000x ./provisioning/
	$(GO) test -run=^$$ -fuzz=FuzzSegmentReader -fuzztime=8000x ./telemetry/outbox/
	$(GO) test -run=^$$ -fuzz=FuzzAckLog -fuzztime=5000x ./telemetry/outbox/
	$(GO) test -run=^$$ -fuzz=FuzzTPMPublic -fuzztime=20000x ./azsim/dps/
	$(GO) test -run=^$$ -fuzz=FuzzSASToken -fuzztime=40000x ./azsim/dps/
	$(GO) test -run=^$$ -fuzz=FuzzKeyFile -fuzztime=100000x ./keystore/softkey/
	$(GO) test -run=^$$ -fuzz=FuzzRegisterBody -fuzztime=20000x ./azsim/dps/

demo: deps build
	./testdata/demo.sh

# Microsoft's Node.js and Python device SDKs against azsim.
sdkcheck: build
	./testdata/install-deps.sh --sdkcheck
	./testdata/sdkcheck.sh

# Two flavours per architecture: CGO-free static (TPM + software keys) and the
# full cgo build with PKCS#11, using Debian's cross compilers.
cross:
	./testdata/install-deps.sh --cross
	@mkdir -p $(BIN)
	$(SHIP) CGO_ENABLED=0 GOOS=linux GOARCH=amd64       $(GO) build -trimpath -tags nopkcs11 -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent-linux-amd64-static ./cmd/gwagent
	$(SHIP) CGO_ENABLED=0 GOOS=linux GOARCH=arm64       $(GO) build -trimpath -tags nopkcs11 -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent-linux-arm64-static ./cmd/gwagent
	$(SHIP) CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -trimpath -tags nopkcs11 -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent-linux-armv7-static ./cmd/gwagent
	$(SHIP) CGO_ENABLED=1 GOOS=linux GOARCH=amd64                                     $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent-linux-amd64 ./cmd/gwagent
	$(SHIP) CGO_ENABLED=1 GOOS=linux GOARCH=arm64       CC=aarch64-linux-gnu-gcc      $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent-linux-arm64 ./cmd/gwagent
	$(SHIP) CGO_ENABLED=1 GOOS=linux GOARCH=arm GOARM=7 CC=arm-linux-gnueabihf-gcc    $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/gwagent-linux-armv7 ./cmd/gwagent
	@cd $(BIN) && for f in gwagent-linux-*; do printf '%-32s %8d bytes\n' $$f $$(stat -c %s $$f); done

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	CGO_ENABLED=0 $(GO) vet -tags nopkcs11 ./...

bench: deps
	./testdata/bench.sh

clean:
	rm -rf $(BIN)

# Debian packages in bin/deb/, checked by lintian: gwagent (CGO-free
# static build) for amd64, arm64 and armhf, and gwagent-pkcs11 (cgo, with
# PKCS#11) for amd64 and arm64. Reproducible: SOURCE_DATE_EPOCH defaults to
# the last commit's time.
DEBDIR ?= $(BIN)/deb
.PHONY: deb deb-check image-check factory-image factory-image-check
deb:
	./testdata/install-deps.sh --deb
	rm -f $(DEBDIR)/gwagent_*.deb $(DEBDIR)/gwagent-pkcs11_*.deb
	./packaging/deb.sh $(DEBDIR) amd64 arm64 armhf amd64-pkcs11 arm64-pkcs11

# The packages' life cycle in a scratch Debian root (root only): offline
# install, upgrade, remove, purge; lintian; a reproducible second build.
deb-check: deb
	./packaging/test-deb.sh $(DEBDIR)

# An arm64 Debian system under qemu with swtpm, against azsim on loopback
# only: the arm64 package under systemd, upgraded from the previous
# release, then provisioning with a late TPM, the spool group, renewal, the
# X.509 factory flow, the PKCS#11 package with its key in SoftHSM2, the
# watchdog, `gwagent check`, a reboot, a network down at boot (see README).
# Root only; the base system is built once (5-20 min) and cached in
# .cache/image/. A release check, not CI.
image-check: deb
	./testdata/install-deps.sh --image
	nice -n 10 ./packaging/image/image-check.sh $(DEBDIR)

# The arm64 image a manufacturer ships, with PRODUCT's settings (README,
# the factory flow).
PRODUCT ?= packaging/image/product-example
factory-image: deb
	./testdata/install-deps.sh --image
	./packaging/image/factory-image.sh $(DEBDIR) $(PRODUCT) $(BIN)/factory

# The factory flow end to end: factory-image for the example product
# pointed at azsim, booted under qemu with swtpm, the README's station
# block over the station login, then in the field: provisioning,
# telemetry, a power cut. Root only; a release check.
factory-image-check: deb
	./testdata/install-deps.sh --image
	nice -n 10 ./packaging/image/factory-image-check.sh $(DEBDIR)

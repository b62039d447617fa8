module github.com/gwagent/gwagent

go 1.26.8

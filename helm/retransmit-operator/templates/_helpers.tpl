{{/* Names and labels shared by every template. */}}

{{- define "retransmit-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "retransmit-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where the operator and its agents run: namespace.name, else the release namespace. */}}
{{- define "retransmit-operator.namespace" -}}
{{- default .Release.Namespace .Values.namespace.name }}
{{- end }}

{{- define "retransmit-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels; pass (dict "root" $ "component" "operator"). */}}
{{- define "retransmit-operator.labels" -}}
helm.sh/chart: {{ include "retransmit-operator.chart" .root }}
{{ include "retransmit-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: retransmit-operator
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "retransmit-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "retransmit-operator.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The operator's objects are named after the release; the agent's add "-agent". */}}
{{- define "retransmit-operator.operatorServiceAccount" -}}
{{- include "retransmit-operator.fullname" . }}
{{- end }}

{{- define "retransmit-operator.agentServiceAccount" -}}
{{- printf "%s-agent" (include "retransmit-operator.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* An image reference from (dict "root" . "image" .Values.<x>.image): repository:tag, or
repository@sha256:... when its tag is a digest; an empty tag is the chart's appVersion. */}}
{{- define "retransmit-operator.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}
